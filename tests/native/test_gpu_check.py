"""The GPU check (tools/gpu_check.sh, harness.gpu_check) as a dry run on the CPU: the same script, from
the offline pack, on a tiny model of the bench's shape family and one architecture of the sweep.
Python here is made to lack what the GPU node lacks (arch, syrupy; gguf, PyYAML, diskcache and the
bindings come from the pack), so an import the node cannot satisfy fails here too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import pack
from harness.gpu_check import SHAPES

pytestmark = pytest.mark.native

ROOT = Path(__file__).resolve().parents[2]
BLOCKER = """
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("arch", "syrupy"):
            raise ImportError(f"{name} is not installed on the GPU node")
sys.meta_path.insert(0, _Absent())
"""


def test_gpu_check_dry_run_on_the_cpu(build, tmp_path):
    archive = pack.make_pack(tmp_path / "offline.tar.gz")
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(tmp_path / "blocker"),
               FQ_UNPACK_DIR=str(tmp_path / "unpacked"), FQ_GPU_CHECK_MODELS=str(tmp_path / "models"))
    proc = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "--pack", str(archive), "--backend", "cpu",
                           "--shape", "tiny", "--only", "llama-dense", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    data = json.loads((out / "gpu_check.json").read_text())
    steps = data["steps"]
    assert proc.returncode == 0, {k: v.get("error") for k, v in steps.items()} or proc.stderr[-3000:]
    assert list(steps) == ["environment", "build", "abi", "load", "rules", "bench", "archs_all"]
    unpacked = str(tmp_path / "unpacked")
    for module in ("llama_cpp", "gguf", "yaml", "diskcache"):
        assert steps["environment"]["modules"][module].startswith(unpacked), module
    assert steps["environment"]["env"]["FQ_LLAMA_CPP_SDIST"].startswith(unpacked)
    assert steps["build"]["build_info"]["key"] == build.fingerprint["key"]
    assert [d.split(":")[0] for d in steps["abi"]["differences"]] == ["DIFFERS llama_opt_params.optimizer_type",
                                                                    "DIFFERS llama_opt_params.*"]
    probes = steps["load"]["probes"]
    assert set(probes) == {"llama-completion", "llama-completion -fit off", "c", "bindings", "bindings, RTLD_GLOBAL",
                           "bindings+log", "driver, 0 layers"} and all(
        p["status"] == "ok" for p in probes.values()), probes
    assert steps["rules"]["change_after_decode"] == {"before": "", "add after": "", "clear after": ""}
    assert [c["differ"] for c in steps["rules"]["renewal"]["cases"]] == [0, 0, 0]
    bench = steps["bench"]
    assert bench["shape"] == SHAPES["tiny"] and set(bench["summary"]) == {"off", "ffn_norm", "ffn_norm+logits",
                                                                         "reference"}
    assert (out / "bench.json").exists()
    archs = steps["archs_all"]
    assert (archs["checked"], archs["bit_identical"], archs["exceptions"]) == (1, 1, {})
    assert "llama-dense | " in (out / "archs-all.md").read_text()
