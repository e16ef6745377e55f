"""``livemig vm``: a long-running VM process driven through QMP and HMP monitors, as QEMU is."""
