"""The private FSDP2 names revtriton/fsdp.py relies on, one test each (issue 16).

A chain drives the gathers and reduce-scatters of the FSDP2 units inside it through FSDP2's
own objects; a torch release that renames or moves one of them must fail here, naming it,
rather than somewhere inside a training step. One subprocess (a world of one on gloo) builds a
unit, runs a step and reports, per name, whether it is where revtriton.fsdp reads it.
"""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

NAMES = {  # name: what revtriton/fsdp.py does with it
    "_fsdp_state._get_module_fsdp_state": "finds the FSDP2 state of a module inside a chain",
    "_fsdp_common.TrainingState": "FORWARD / PRE_BACKWARD / POST_BACKWARD / IDLE",
    "FSDPState._fsdp_param_groups": "the param groups of a unit (2.12+; _fsdp_param_group before)",
    "FSDPState._training_state": "says pre-backward while the chain runs a unit's call",
    "FSDPState._is_root": "False once a root unit has lazily initialised it (no root: refused)",
    "FSDPState._modules": "the modules of a unit (one outside the chain: refused)",
    "FSDPState._mp_policy": "the dtype F/G compute in under a block-level mixed-precision unit",
    "FSDPParamGroup.unshard": "gathers a unit",
    "FSDPParamGroup.wait_for_unshard": "waits for the gather and puts the unsharded parameters in place",
    "FSDPParamGroup.reshard": "frees a unit after its forward use",
    "FSDPParamGroup.post_backward": "reduce-scatters a unit's gradients and reshards it",
    "FSDPParamGroup._training_state": "state the gather and reshard run in",
    "FSDPParamGroup.fsdp_params": "a unit's parameters",
    "FSDPParam.unsharded_param": "the gathered parameter whose .grad post_backward reduces",
    "FSDPParam._module_info": "the (module, name) slots a unit manages",
}


def probe():
    """Run in a subprocess: check every name, print ``{name: null or error}`` as JSON."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    from torch import nn

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    report = {}

    def check(name, fn):
        try:
            fn()
            report[name] = None
        except Exception as e:  # noqa: BLE001  (reported per name)
            report[name] = f"{type(e).__name__}: {e}"

    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.fsdp._fully_shard import _fsdp_common, _fsdp_state

        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        fully_shard(model[0])
        fully_shard(model)
        model(torch.randn(2, 4)).sum().backward()
        state = _fsdp_state._get_module_fsdp_state(model[0])
        states = _fsdp_common.TrainingState

        def groups():
            many = getattr(state, "_fsdp_param_groups", None)
            found = many if isinstance(many, list) else [state._fsdp_param_group]
            assert len(found) == 1 and found[0] is not None, found
            return found[0]

        def has(obj, *attrs):
            for attr in attrs:
                assert hasattr(obj, attr), f"{type(obj).__name__} has no attribute {attr!r}"

        check("_fsdp_state._get_module_fsdp_state", lambda: state.__class__.__name__ == "FSDPState" or 1 / 0)
        check("_fsdp_common.TrainingState", lambda: [states[n] for n in ("FORWARD", "PRE_BACKWARD", "POST_BACKWARD",
                                                                        "IDLE")])
        check("FSDPState._fsdp_param_groups", groups)
        check("FSDPState._training_state", lambda: isinstance(state._training_state, states) or 1 / 0)
        check("FSDPState._is_root", lambda: state._is_root is False or 1 / 0)
        check("FSDPState._modules", lambda: tuple(state._modules) == (model[0],) or 1 / 0)
        check("FSDPState._mp_policy", lambda: has(state._mp_policy, "param_dtype", "cast_forward_inputs"))
        group = groups()
        for method in ("unshard", "wait_for_unshard", "reshard", "post_backward"):
            check(f"FSDPParamGroup.{method}", lambda m=method: callable(getattr(group, m)) or 1 / 0)
        check("FSDPParamGroup._training_state", lambda: isinstance(group._training_state, states) or 1 / 0)
        check("FSDPParamGroup.fsdp_params", lambda: len(group.fsdp_params) == 2 or 1 / 0)
        param = group.fsdp_params[0]
        check("FSDPParam.unsharded_param", lambda: (has(param, "_unsharded_param"),
                                                    param.unsharded_param.shape == (4, 4) or 1 / 0))
        check("FSDPParam._module_info", lambda: (has(param._module_info, "module", "param_name", "shared_modules",
                                                     "shared_param_names"),
                                                 param._module_info.module is model[0] or 1 / 0))
    finally:
        dist.destroy_process_group()
    print(json.dumps(report))


@pytest.fixture(scope="module")
def report():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(NAMES))
def test_private_fsdp2_name_is_where_revtriton_reads_it(report, name):
    import torch

    assert name in report, f"the probe did not reach {name}"
    assert report[name] is None, (
        f"torch {torch.__version__} moved the private FSDP2 name {name} ({NAMES[name]}): {report[name]}. "
        f"Update revtriton/fsdp.py, which reads it, for this release")


def test_revtriton_fsdp_reads_its_names_through_one_namespace():
    """revtriton.fsdp resolves the module-level names once, the rest on the objects above."""
    from revtriton import fsdp

    names = fsdp.internals()
    assert callable(names.get_state) and hasattr(names.TrainingState, "PRE_BACKWARD")


DDP_ALONE = """
import torch, torch.distributed as dist
from torch import nn
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
import revtriton as rt
from revtriton import fsdp
reads, internals = [], fsdp.internals
fsdp.internals = lambda: reads.append(1) or internals()
chain = rt.ReversibleSequential(rt.ReversibleBlock(nn.Linear(2, 2), nn.Linear(2, 2), dim=-1))
chain(torch.randn(3, 4, requires_grad=True)).sum().backward()
assert fsdp.chain_units(tuple(chain)) is None and reads == [], reads
from torch.distributed.fsdp import fully_shard
fully_shard(nn.Linear(2, 2))  # a unit elsewhere in the process: the chain looks for units inside it again
assert fsdp.chain_units(tuple(chain)) is None and reads == [1], reads
dist.destroy_process_group()
"""


def test_a_chain_with_a_process_group_and_no_fsdp2_unit_walks_none_of_its_modules():
    """Under DDP alone (a process group, no fully_shard anywhere) a chain's call looks for no FSDP2
    unit: the walk cost 5 µs per block and call on the overhead workload. A fresh process, so
    that no unit exists before the first check."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run([sys.executable, "-c", DDP_ALONE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


if __name__ == "__main__":
    probe()
