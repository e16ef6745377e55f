"""Compression accelerators: what this host has (``livemig accel``) and which method to use
(``livemig advise``). ``sample`` holds the page data both measure on."""
