"""``livemig accel`` inventory on a fake sysfs tree, and ``livemig advise``'s model and rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from livemig.accel import inventory as invmod
from livemig.accel.cli import render_inventory
from livemig.advise import Measurement, advise, hardware_rules, predict, recommend, render
from livemig.cli import main

PAGE = 4096


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def fake_sysfs(root: Path, dev: Path, *, svm: bool = True) -> None:
    pci = root / "bus" / "pci" / "devices"
    drivers = root / "bus" / "pci" / "drivers"
    groups = root / "kernel" / "iommu_groups"
    for addr, did, driver, group in (
        ("0000:6b:00.0", "0x4940", "4xxx", "14"),
        ("0000:6b:00.1", "0x4941", "vfio-pci", "15"),
        ("0000:6b:00.2", "0x4941", "vfio-pci", "16"),
        ("0000:00:1f.0", "0x1234", "other", "1"),
        ("0000:6a:02.0", "0x0cfe", "idxd", "17"),
    ):
        d = pci / addr
        _write(d / "vendor", "0x8086")
        _write(d / "device", did)
        _write(d / "numa_node", "0")
        (drivers / driver).mkdir(parents=True, exist_ok=True)
        (groups / group).mkdir(parents=True, exist_ok=True)
        os.symlink(drivers / driver, d / "driver")
        os.symlink(groups / group, d / "iommu_group")
    (dev / "vfio").mkdir(parents=True)
    _write(dev / "vfio" / "15", "")
    dsa = root / "bus" / "dsa" / "devices"
    _write(dsa / "iax1" / "state", "enabled")
    _write(dsa / "iax1" / "pasid_enabled", "1" if svm else "0")
    for wq, state in (("wq1.0", "enabled"), ("wq1.1", "disabled")):
        _write(dsa / wq / "state", state)
        _write(dsa / wq / "mode", "shared")
        _write(dsa / wq / "type", "user")
        _write(dsa / wq / "size", "64")
        _write(dsa / wq / "name", "iaa_crypto")
    _write(dsa / "dsa0" / "state", "enabled")  # a DSA device: not IAA
    uacce = root / "class" / "uacce" / "hisi_zip-0"
    _write(uacce / "api", "hisi_qm_v3")
    _write(uacce / "flags", "0x1")
    _write(uacce / "algorithms", "zlib\ngzip\ndeflate")
    _write(uacce / "available_instances", "255")


def test_inventory_reads_sysfs(tmp_path: Path) -> None:
    fake_sysfs(tmp_path / "sys", tmp_path / "dev")
    inv = invmod.scan(tmp_path / "sys", tmp_path / "dev", libraries=False)
    assert [(q.address, q.model, q.function, q.driver) for q in inv.qat] == [
        ("0000:6b:00.0", "4xxx", "PF", "4xxx"),
        ("0000:6b:00.1", "4xxx", "VF", "vfio-pci"),
        ("0000:6b:00.2", "4xxx", "VF", "vfio-pci"),
    ]
    assert inv.qat[0].vfio.startswith("not bound to vfio-pci")
    assert inv.qat[1].vfio.startswith("usable")
    assert inv.qat[2].vfio.startswith("absent")
    assert [d.name for d in inv.iaa] == ["iax1"] and inv.iaa_svm()
    assert [wq["name"] for wq in inv.iaa[0].work_queues] == ["wq1.0", "wq1.1"]
    assert inv.iaa_work_queues() == 1
    assert inv.iaa_pci == ["0000:6a:02.0 (driver idxd)"]
    assert inv.uacce[0].sva and "zlib" in inv.uacce[0].algorithms
    text = render_inventory(inv, [])
    assert "0000:6b:00.1   4xxx     VF" in text and "wq1.0: enabled, mode shared" in text
    assert "hisi_zip-0: api hisi_qm_v3, SVA" in text
    json.dumps(inv.to_json())


def test_inventory_of_this_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["accel", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {m["method"] for m in data["methods"]} == {"none", "zlib", "zstd", "qatzip", "qpl", "uadk"}
    qz = next(m for m in data["methods"] if m["method"] == "qatzip")
    # the registry only claims hardware when libqatzip reports a device
    assert qz["accelerated"] == data["qatzip_hardware"]
    assert any(lib["name"] == "libqatzip.so.3" for lib in data["libraries"])


def _m(name: str, ratio: float, comp: float, dec: float, accelerated: bool = False) -> Measurement:
    return Measurement(name, 1, "test", accelerated, ratio, comp, dec, 1 / comp, 1 / dec, 2 * comp, 2 * dec, 2)


def test_predict_limits() -> None:
    bw = 10 * 10**9 // 8
    # a fast link: CPU-bound sender with 2 cores even with 8 channels
    p = predict(_m("zstd", 3.0, 500e6, 1500e6), bw, 8, 2)
    assert p.limit == "sender" and p.rate == pytest.approx(1000e6)
    assert p.send_cpu_percent == pytest.approx(200) and p.recv_cpu_percent == pytest.approx(1000 / 15)
    # 16 cores: 8 channel threads of 500 MB/s = 4 GB/s > 1.25 GB/s x 3 -> link-limited
    p = predict(_m("zstd", 3.0, 500e6, 1500e6), bw, 8, 16)
    assert p.limit == "link" and p.rate == pytest.approx(3 * bw)
    assert p.pages_per_second == pytest.approx(3 * bw / PAGE)
    assert p.wire_rate == pytest.approx(bw)
    # a slow receiver
    p = predict(_m("zlib", 3.0, 500e6, 100e6), bw, 8, 16)
    assert p.limit == "receiver"


def test_recommend_prefers_cheaper_when_close() -> None:
    bw = 10 * 10**9 // 8
    a = predict(_m("zstd", 3.0, 500e6, 1500e6), bw, 8, 16)
    b = predict(_m("qatzip", 2.9, 600e6, 1200e6), bw, 8, 16)  # 3 % fewer pages/s, less CPU
    pick, why, _ = recommend([a, b], None, bw)
    assert pick.measurement.method == "qatzip" and "within 5 %" in why
    c = predict(_m("none", 1.0, 10e9, 10e9), bw, 8, 16)
    pick, _, _ = recommend([a, b, c], None, bw)
    assert pick.measurement.method in ("zstd", "qatzip")


def test_hardware_rules(tmp_path: Path) -> None:
    fake_sysfs(tmp_path / "sys", tmp_path / "dev")
    inv = invmod.scan(tmp_path / "sys", tmp_path / "dev", libraries=False)
    # no library says hardware: rules do not apply
    assert hardware_rules(inv, link_limited=True)[0] is None or not inv.qat_usable()
    inv.qatzip_hardware = True
    assert hardware_rules(inv, link_limited=True)[0] == "qatzip"  # rule 1: 3 QAT functions >= 1 IAA wq
    pick, notes = hardware_rules(inv, link_limited=False, livemig_drives_iaa=True)
    assert pick == "qpl" and "rule 3" in notes[-1]
    inv.iaa[0].pasid_enabled = False
    pick, notes = hardware_rules(inv, link_limited=False, livemig_drives_iaa=True)
    assert pick == "qatzip" and "rule 2" in notes[-1]
    inv.qatzip_hardware = False
    pick, notes = hardware_rules(inv, link_limited=False, livemig_drives_iaa=False)
    assert pick is None and "CPU" in notes[-1]
    # a QAT-only host: qatzip
    inv.qatzip_hardware, inv.iaa = True, []
    assert hardware_rules(inv, link_limited=False)[0] == "qatzip"


def test_advise_measures_and_recommends() -> None:
    adv = advise(
        bandwidth=10 * 10**9 // 8, channels=8, sample_bytes=1 << 20, candidates="zstd:1,qatzip:1,qpl", repeat=1
    )
    assert [p.measurement.method for p in adv.predictions] == ["zstd", "qatzip", "qpl"]
    for p in adv.predictions:
        assert p.measurement.ratio > 1.5 and p.pages_per_second > 0 and p.send_cpu_percent > 0
    assert adv.recommended in ("zstd", "qatzip", "qpl")
    text = render(adv)
    assert "recommended:" in text and "qatzip-1" in text


def test_advise_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advise", "--bandwidth", "1Gbps", "--multifd-channels", "4", "--sample-size", "1M",
                 "--methods", "none,qatzip:1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bandwidth"] == 125_000_000 and data["channels"] == 4
    names = [p["measurement"]["method"] for p in data["predictions"]]
    assert names == ["none", "qatzip"] and data["recommended"] in names
    none = data["predictions"][0]
    assert none["limit"] == "link" and none["pages_per_second"] == pytest.approx(125_000_000 / PAGE)
    assert main(["advise", "--methods", "qatzip:12"]) == 2  # a bad parameter: exit status 2, as argparse
    assert "between 1 and 9" in capsys.readouterr().err


def _doubled(text: str) -> bool:
    """'x.so: x.so: ...': a name said twice in a row."""
    import re

    return re.search(r"([\w./-]+\.so[\w.]*): \1:", text) is not None


def test_a_library_that_does_not_load_is_named_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from livemig.compress import libqatzip
    from livemig.errors import MethodUnavailable

    lib = invmod._try_load("libnothere.so.1", ["libnothere.so.1", "libnothere.so"])
    assert not lib.loads
    assert lib.detail == "libnothere.so.1, libnothere.so: cannot open shared object file: No such file or directory"
    # libqatzip without the project copy and without a system one
    monkeypatch.setattr(libqatzip, "vendor_dir", lambda: Path("/nonexistent"))
    monkeypatch.setattr(libqatzip, "_candidates", lambda: ["libqatzip-nothere.so.3"])
    monkeypatch.setattr(libqatzip, "_lib", None)
    monkeypatch.setattr(libqatzip, "_load_error", None)
    with pytest.raises(MethodUnavailable) as info:
        libqatzip.load()
    text = str(info.value)
    assert text.startswith("libqatzip.so.3 could not be loaded (tried libqatzip-nothere.so.3: cannot open shared")
    assert not _doubled(text) and text.count("libqatzip-nothere.so.3") == 1


def test_accel_libraries_rows_name_each_library_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["accel"]) == 0
    rows = capsys.readouterr().out.split("Libraries:")[1].split("Methods:")[0].splitlines()
    assert rows and not any(_doubled(r) for r in rows)
    qpl = next(r for r in rows if r.split()[:1] == ["libqpl.so.1"])
    assert "libqpl.so.1" in qpl.split(None, 2)[2] or " loads " in qpl  # the name tried is the row's own
