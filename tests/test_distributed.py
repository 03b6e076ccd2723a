"""DistributedDataParallel and FSDP2 around a reversible chain (issue 3, point 9).

Two CPU processes on a gloo process group over loopback run every scenario of
tests/distributed_worker.py once (one spawn for the module); each test then compares one
scenario's gradients with one process on the whole batch.
"""
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_worker as worker
from helpers import rel_err

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORLD, TIMEOUT_S = 2, 120


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each rank's results, by scenario. Worker processes are killed if they outlive TIMEOUT_S."""
    out = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(worker.worker, args=(WORLD, free_port(), str(out), list(worker.SCENARIOS)),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers still running after {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def result(runs, scenario, rank):
    res = runs[rank][scenario]
    assert "error" not in res, f"{scenario} on rank {rank} raised:\n{res.get('traceback')}"
    return res


def assert_grads_equal_single_process(runs, scenario):
    _, model_kwargs = worker.SCENARIOS[scenario]
    expected = worker.reference(**model_kwargs)
    for rank in range(WORLD):
        grads = result(runs, scenario, rank)["grads"]
        assert grads.keys() == expected.keys()
        for name, g in grads.items():
            if expected[name] is None:
                assert g is None, name
            else:
                assert g is not None and rel_err(g, expected[name]) <= 1e-5, (scenario, rank, name)


def test_workers_run_the_kernels_the_way_this_session_does(runs):
    for rank in range(WORLD):
        assert runs[rank]["env"]["TRITON_INTERPRET"] == os.environ.get("TRITON_INTERPRET")


def test_the_model_shares_a_parameter_between_two_blocks():
    """The premise of the readiness checks below (and a check that the batch is split)."""
    model = worker.Model()
    assert model.chain[2].g is model.chain[0].f
    assert worker.batch(model).shape[0] % WORLD == 0


def test_every_encoder_decoder_parameter_gets_a_gradient():
    """The premise of ddp_encoder_decoder: the encoder learns only through the decoder's side input."""
    grads = worker.reference(seq2seq=True)
    assert any(name.startswith("model.encoder.") for name in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("scenario", ["ddp", "ddp_find_unused", "ddp_encoder_decoder"])
def test_ddp_gradients_equal_one_process_on_the_whole_batch(runs, scenario):
    """ddp_encoder_decoder: the encoder's output is a side input of the decoder chain, through
    which every encoder parameter gets its gradient, ready once per backward."""
    assert_grads_equal_single_process(runs, scenario)


@pytest.mark.parametrize("scenario", ["ddp", "ddp_find_unused", "ddp_encoder_decoder"])
def test_ddp_sees_each_parameter_ready_once_per_backward(runs, scenario):
    """The chain returns every parameter gradient from its one autograd node, so autograd
    accumulates into each parameter (DDP's readiness signal) once per backward, for the shared
    parameter too; the second step shows DDP found its reduction finished after the first."""
    for rank in range(WORLD):
        counts = result(runs, scenario, rank)["counts"]
        assert len(counts) == 2
        for step in counts:
            for name, count in step.items():
                assert count == (0 if name.startswith("unused.") else 1), (rank, name, count)


@pytest.mark.parametrize("scenario", ["fsdp2_root", "fsdp2_chain", "fsdp2_per_block_called_alone"])
def test_fsdp2_unit_enclosing_the_chain_gives_single_process_gradients(runs, scenario):
    """fully_shard on the model, on the ReversibleSequential, or on each block when the blocks
    are called one by one (each a chain of its own): FSDP2 gathers the chain's parameters
    around its call and again before its backward (into the same tensors the chain holds),
    and reduce-scatters the gradients the chain returns."""
    assert_grads_equal_single_process(runs, scenario)


@pytest.mark.parametrize("scenario, where", [("fsdp2_per_block", "blocks[0]"), ("fsdp2_per_f_and_g", "blocks[0].f")])
def test_fsdp2_units_inside_the_chain_are_supported_or_refused_clearly(runs, scenario, where):
    """fully_shard on the blocks, or on F and G: the chain calls F and G itself and recomputes
    them in backward, bypassing those units' hooks. Either the gradients are right, or the step
    is refused naming the unit and the setting to use; never silently missing gradients."""
    res = runs[0][scenario]
    if "error" not in res:
        assert_grads_equal_single_process(runs, scenario)
        return
    for rank in range(WORLD):
        error = runs[rank][scenario]["error"]
        assert where in error and "fully_shard" in error and "ReversibleSequential" in error, error
