"""Golden partition specs: every parameter of the `paper` student on two meshes.

A change to a logical axis name, a rule or a parameter's shape that moves any parameter's
sharding fails here with a readable diff (path: shape spec). If the change is intended,
regenerate and review the diff in the commit:

    python -m tests.test_sharding_golden
"""

import difflib
import json
import pathlib

import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from configs import student as student_config
from spatial_distill import sharding
from spatial_distill.models import student as student_lib

GOLDEN = pathlib.Path(__file__).parent / "golden"
MESHES = {"fsdp8": (1, 8, 1), "data2_fsdp2_tensor4": (2, 2, 4)}


def _spec_entry(axes):
    return axes if axes is None or isinstance(axes, str) else list(axes)


def paper_specs(mesh_shape) -> dict[str, dict]:
    """`{param path: {"shape": [...], "spec": [...]}}` as the trainer shards `paper` on a mesh
    of `mesh_shape` (data, fsdp, tensor); no devices are needed (an abstract mesh)."""
    config = student_config.get_config("paper")
    cfg = student_lib.config_from(config.model, config.data.image_size, None)
    state = nnx.state(nnx.eval_shape(lambda: student_lib.Student(cfg, rngs=nnx.Rngs(0))))
    mesh = AbstractMesh(tuple(mesh_shape), sharding.MESH_AXES)
    specs = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES)
    shapes = dict(state.flat_state())
    out = {}
    for path, variable in specs.flat_state():
        spec = variable.get_value().spec
        shape = list(shapes[path].get_value().shape)
        out["/".join(map(str, path))] = {"shape": shape,
                                         "spec": [_spec_entry(a) for a in spec] + [None] * (len(shape) - len(spec))}
    return out


def _lines(specs: dict[str, dict]) -> list[str]:
    return [f"{path}: {v['shape']} {v['spec']}" for path, v in sorted(specs.items())]


@pytest.mark.parametrize("name", sorted(MESHES))
def test_paper_partition_specs_match_golden(name):
    path = GOLDEN / f"paper_sharding_{name}.json"
    want = json.loads(path.read_text())
    got = paper_specs(MESHES[name])
    if got != want:
        diff = list(difflib.unified_diff(_lines(want), _lines(got), f"golden {path.name}", "now", lineterm="", n=0))
        shown = "\n".join(diff[:60]) + (f"\n... {len(diff) - 60} more lines" if len(diff) > 60 else "")
        pytest.fail(f"partition specs of `paper` on mesh {MESHES[name]} changed "
                    f"(if intended: python -m tests.test_sharding_golden):\n{shown}")


def test_golden_files_shard_what_matters():
    """The golden files are not vacuous: on fsdp=8 every large matrix is split 8 ways, and on
    the 2x2x4 mesh the decoder's attention and MLP kernels are tensor-parallel."""
    fsdp = json.loads((GOLDEN / "paper_sharding_fsdp8.json").read_text())
    big = {p: v for p, v in fsdp.items() if len(v["shape"]) >= 2 and min(v["shape"][-2:]) >= 1024}
    assert len(big) > 100
    assert all("fsdp" in v["spec"] for v in big.values()), [p for p, v in big.items() if "fsdp" not in v["spec"]][:5]
    tp = json.loads((GOLDEN / "paper_sharding_data2_fsdp2_tensor4.json").read_text())
    decoder = [v for p, v in tp.items() if p.startswith("decoder/") and len(v["shape"]) >= 3]
    assert decoder and sum("tensor" in v["spec"] for v in decoder) >= len(decoder) // 2


if __name__ == "__main__":
    GOLDEN.mkdir(exist_ok=True)
    for name, shape in MESHES.items():
        target = GOLDEN / f"paper_sharding_{name}.json"
        target.write_text(json.dumps(paper_specs(shape), indent=0, sort_keys=True) + "\n")
        print(f"wrote {target}")
