"""livemig: live migration of virtual machines over QEMU's multifd wire format.

Public pieces:
- :mod:`livemig.wire`: sans-IO codecs of QEMU's multifd handshake, packets and main stream.
- :mod:`livemig.compress`: the method registry (none, zlib, zstd, qatzip, qpl, uadk).
- :mod:`livemig.guest`: guests behind one interface (portable, KVM).
- :mod:`livemig.migration`: the precopy source, the destination and their statistics.
"""

__version__ = "0.1.0"
