"""What compression accelerators this host has, read from sysfs, and which of their libraries load.

* QAT: PCI functions with vendor 8086 and a QuickAssist device id (``/sys/bus/pci/devices``), their
  kernel driver, IOMMU group and whether ``/dev/vfio/<group>`` is usable (the in-tree qatlib needs
  vfio access), or the out-of-tree driver's ``/dev/qat_*`` nodes.
* IAA (In-Memory Analytics Accelerator, what QPL uses): ``idxd`` devices named ``iax*`` on
  ``/sys/bus/dsa``, their enabled work queues (mode, type, size) and whether PASID/SVM is on.
* UADK: ``/sys/class/uacce`` devices (HiSilicon ZIP and others), their algorithms and SVA flag.
* Libraries: libqatzip.so.3 (and whether a device serves it), libqat.so.4, libqpl, libwd/libwd_comp,
  libaccel-config, and the ISA-L that the ``isal`` package bundles.

Everything is a pure read of files under a configurable ``sysfs`` root, so tests can point it at a
fake tree. Nothing here needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

INTEL = "0x8086"

#: Intel QuickAssist PCI device ids (Linux drivers/crypto/intel/qat, adf_*_hw_data.h) -> (model, PF/VF)
QAT_DEVICE_IDS: dict[str, tuple[str, str]] = {
    "0x0435": ("DH895xCC", "PF"), "0x0443": ("DH895xCC", "VF"),
    "0x37c8": ("C62x", "PF"), "0x37c9": ("C62x", "VF"),
    "0x19e2": ("C3xxx", "PF"), "0x19e3": ("C3xxx", "VF"),
    "0x18ee": ("200xx", "PF"), "0x18ef": ("200xx", "VF"),
    "0x6f54": ("D15xx", "PF"), "0x6f55": ("D15xx", "VF"),
    "0x18a0": ("C4xxx", "PF"), "0x18a1": ("C4xxx", "VF"),
    "0x4940": ("4xxx", "PF"), "0x4941": ("4xxx", "VF"),
    "0x4942": ("401xx", "PF"), "0x4943": ("401xx", "VF"),
    "0x4944": ("402xx", "PF"), "0x4945": ("402xx", "VF"),
    "0x4946": ("420xx", "PF"), "0x4947": ("420xx", "VF"),
    "0x4948": ("6xxx", "PF"), "0x4949": ("6xxx", "VF"),
}  # fmt: skip

#: Intel IAA (IAX) PCI device id, for hosts where idxd is not bound
IAA_DEVICE_IDS = {"0x0cfe": "IAA"}


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


@dataclass
class QatFunction:
    """One QAT PCI function."""

    address: str
    device_id: str
    model: str
    function: str  # PF or VF
    driver: str | None
    iommu_group: str | None
    vfio: str  # "usable", "no access", "absent", "not bound to vfio"
    numa_node: str | None


@dataclass
class IaaDevice:
    """One IAA device on the idxd (dsa) bus."""

    name: str
    state: str | None
    pasid_enabled: bool | None
    work_queues: list[dict[str, str | None]] = field(default_factory=list)


@dataclass
class UacceDevice:
    """One uacce device (UADK)."""

    name: str
    api: str | None
    algorithms: list[str]
    sva: bool | None
    available_instances: str | None


@dataclass
class Library:
    """Whether a shared library loads, and from where, or why not."""

    name: str
    loads: bool
    detail: str


@dataclass
class Inventory:
    """Everything :func:`scan` found."""

    qat: list[QatFunction]
    iaa: list[IaaDevice]
    iaa_pci: list[str]
    uacce: list[UacceDevice]
    libraries: list[Library]
    qatzip_hardware: bool
    qatzip_detail: str
    sysfs: str = "/sys"

    def to_json(self) -> dict[str, Any]:
        """Plain dict for ``--json``."""
        return asdict(self)

    def qat_usable(self) -> bool:
        """A QAT function exists and libqatzip reports hardware."""
        return bool(self.qat) and self.qatzip_hardware

    def iaa_work_queues(self) -> int:
        """Enabled user-mode IAA work queues (what libqpl's hardware path can use)."""
        return sum(
            1
            for dev in self.iaa
            for wq in dev.work_queues
            if wq.get("state") == "enabled" and wq.get("type") in ("user", None)
        )

    def iaa_svm(self) -> bool:
        """Any IAA device with PASID (shared virtual memory) enabled."""
        return any(dev.pasid_enabled for dev in self.iaa)


def scan_qat(sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> list[QatFunction]:
    """QAT PCI functions under ``sysfs/bus/pci/devices``."""
    out: list[QatFunction] = []
    base = sysfs / "bus" / "pci" / "devices"
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir()):
        if _read(d / "vendor") != INTEL:
            continue
        did = _read(d / "device") or ""
        if did not in QAT_DEVICE_IDS:
            continue
        model, fn = QAT_DEVICE_IDS[did]
        driver = _link_name(d / "driver")
        group = _link_name(d / "iommu_group")
        if group is None:
            vfio = "absent (no IOMMU group)"
        elif driver != "vfio-pci" and fn == "PF":
            vfio = f"not bound to vfio-pci (driver {driver})"
        else:
            node = dev / "vfio" / group
            if not node.exists():
                vfio = f"absent ({node} missing)"
            elif os.access(node, os.R_OK | os.W_OK):
                vfio = f"usable ({node})"
            else:
                vfio = f"no access to {node} (join group qat or run as root)"
        out.append(QatFunction(d.name, did, model, fn, driver, group, vfio, _read(d / "numa_node")))
    return out


def scan_iaa(sysfs: Path = Path("/sys")) -> tuple[list[IaaDevice], list[str]]:
    """IAA devices on ``sysfs/bus/dsa`` (with their work queues), and IAA PCI functions."""
    devices: list[IaaDevice] = []
    base = sysfs / "bus" / "dsa" / "devices"
    if base.is_dir():
        entries = sorted(base.iterdir())
        for d in entries:
            if not d.name.startswith("iax"):
                continue
            pasid = _read(d / "pasid_enabled")
            dev = IaaDevice(d.name, _read(d / "state"), None if pasid is None else pasid == "1")
            idx = d.name[3:]
            for wq in entries:
                if wq.name.startswith(f"wq{idx}."):
                    dev.work_queues.append(
                        {
                            "name": wq.name,
                            "state": _read(wq / "state"),
                            "mode": _read(wq / "mode"),
                            "type": _read(wq / "type"),
                            "size": _read(wq / "size"),
                            "wq_name": _read(wq / "name"),
                        }
                    )
            devices.append(dev)
    pci: list[str] = []
    pbase = sysfs / "bus" / "pci" / "devices"
    if pbase.is_dir():
        for d in sorted(pbase.iterdir()):
            if _read(d / "vendor") == INTEL and (_read(d / "device") or "") in IAA_DEVICE_IDS:
                pci.append(f"{d.name} (driver {_link_name(d / 'driver')})")
    return devices, pci


def scan_uacce(sysfs: Path = Path("/sys")) -> list[UacceDevice]:
    """Devices under ``sysfs/class/uacce``."""
    out: list[UacceDevice] = []
    base = sysfs / "class" / "uacce"
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir()):
        flags = _read(d / "flags")
        sva: bool | None = None
        if flags is not None:
            with contextlib.suppress(ValueError):
                sva = bool(int(flags, 0) & 1)  # UACCE_DEV_SVA
        algs = (_read(d / "algorithms") or "").split()
        out.append(UacceDevice(d.name, _read(d / "api"), algs, sva, _read(d / "available_instances")))
    return out


def _try_load(name: str, candidates: list[str]) -> Library:
    from ..compress.libqatzip import load_failures

    errors: list[tuple[str, BaseException]] = []
    for cand in candidates:
        try:
            ctypes.CDLL(cand)
        except OSError as exc:
            errors.append((cand, exc))
            continue
        return Library(name, True, f"loads ({cand})")
    found = ctypes.util.find_library(name.removeprefix("lib").split(".so")[0])
    return Library(name, False, load_failures(errors) if errors else f"not found (find_library: {found})")


def scan_libraries() -> tuple[list[Library], bool, str]:
    """Which accelerator libraries load, plus libqatzip's hardware probe (hardware?, detail)."""
    from ..compress import libqatzip  # local: keeps sysfs scans free of ctypes setup

    libs: list[Library] = []
    probe = libqatzip.probe()
    libs.append(Library("libqatzip.so.3", probe.loaded, probe.detail))
    vend = libqatzip.vendor_dir()
    vendored = [str(vend / "libqat.so.4")] if (vend / "libqat.so.4").exists() else []
    libs.append(_try_load("libqat.so.4", [*vendored, "libqat.so.4"]))
    libs.append(_try_load("libqpl.so.1", ["libqpl.so.1", "libqpl.so"]))
    libs.append(_try_load("libwd.so", ["libwd.so.2", "libwd.so"]))
    libs.append(_try_load("libwd_comp.so", ["libwd_comp.so.2", "libwd_comp.so"]))
    libs.append(_try_load("libaccel-config.so.1", ["libaccel-config.so.1"]))
    try:
        import isal

        libs.append(Library("isal (python)", True, f"isal {isal.__version__} with bundled ISA-L (CPU deflate)"))
    except ImportError as exc:
        libs.append(Library("isal (python)", False, f"{exc}: pip install isal"))
    return libs, probe.hardware, probe.detail


def scan(sysfs: Path = Path("/sys"), dev: Path = Path("/dev"), libraries: bool = True) -> Inventory:
    """The whole inventory (sysfs under ``sysfs``; library probes unless ``libraries`` is False)."""
    iaa, iaa_pci = scan_iaa(sysfs)
    if libraries:
        libs, qz_hw, qz_detail = scan_libraries()
    else:
        libs, qz_hw, qz_detail = [], False, "not probed"
    return Inventory(scan_qat(sysfs, dev), iaa, iaa_pci, scan_uacce(sysfs), libs, qz_hw, qz_detail, str(sysfs))
