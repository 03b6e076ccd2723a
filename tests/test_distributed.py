"""DistributedDataParallel and FSDP2 around a reversible chain (issue 3, point 9), FSDP2
units inside it: per block, per F and G, nested, and tensor and sequence parallelism inside
F and G around a plain local stream (issue 16).

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
    context = mp.start_processes(worker.worker, args=(WORLD, free_port(), str(out), list(worker.SCENARIOS) + list(worker.STANDALONE)),
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


INSIDE = ["fsdp2_per_block", "fsdp2_per_f_and_g", "fsdp2_per_f_and_g_shared", "fsdp2_nested",
          "fsdp2_per_block_and_chain", "fsdp2_per_block_no_reshard",
          "fsdp2_per_block_side_inputs", "fsdp2_per_f_and_g_side_inputs"]


@pytest.mark.parametrize("scenario", INSIDE)
def test_fsdp2_units_inside_the_chain_give_single_process_gradients(runs, scenario):
    """fully_shard on each block, on each F and G, on modules inside them (nested), on the blocks
    and the chain, with reshard_after_forward=False, and in an encoder-decoder whose decoder reads
    the encoder's output as a side input (whose gradient reaches the encoder): the chain gathers
    each unit around its own forward call and recompute, and reduce-scatters its gradients as soon
    as its recompute's backward is done. _shared: blocks[0].f is blocks[2].g, a unit used as F in
    one block and G in another, gathered and reduce-scattered around each use."""
    assert_grads_equal_single_process(runs, scenario)


def test_each_block_prefetches_the_next_blocks_units_in_both_directions(runs):
    """While block i runs (forward: 0, 1, 2) or recomputes (backward: 2, 1, 0), the all-gather of
    the next block's unit is already started, as FSDP2 prefetches for ordinary models: at most
    two units are gathered at a time."""
    assert_grads_equal_single_process(runs, "fsdp2_per_block_prefetch")
    for rank in range(WORLD):
        assert result(runs, "fsdp2_per_block_prefetch", rank)["prefetched"] == [1, 2, 1, 0]


@pytest.mark.parametrize("scenario", ["fsdp2_per_block_accumulate", "fsdp2_per_f_and_g_accumulate"])
def test_fsdp2_units_inside_the_chain_accumulate_gradients_without_sync(runs, scenario):
    """set_requires_gradient_sync(False) for one backward, True for the next, without zeroing:
    FSDP keeps the first backward's unsharded gradients and reduces both with the second."""
    _, model_kwargs = worker.SCENARIOS[scenario]
    expected = worker.reference(**model_kwargs)
    for rank in range(WORLD):
        grads = result(runs, scenario, rank)["grads"]
        for name, g in grads.items():
            assert rel_err(g, 2 * expected[name]) <= 1e-5, (scenario, rank, name)


def _norm_err(grads, expected):
    return max(rel_err(grads[name], g) for name, g in expected.items())


@pytest.mark.parametrize("scenario", ["fsdp2_per_block_mixed_precision", "fsdp2_per_f_and_g_mixed_precision",
                                      "fsdp2_per_block_mixed_precision_fp32_root"])
def test_fsdp2_units_inside_the_chain_with_mixed_precision(runs, scenario):
    """MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32) on the units (and the root,
    except _fp32_root, where the stream stays fp32 and each F and G computes in bf16, its input
    cast as FSDP's hook would). bf16 parameters put the gradients ~1e-2 away from fp32 ones,
    so the yardstick is FSDP's own mixed precision with one unit at the root, on the same ranks:
    the error against fp32 must stay within twice that one's plus one bf16 ulp (2**-8), the
    rule of DESIGN.md's reading list (flash-attention's tests)."""
    _, model_kwargs = worker.SCENARIOS[scenario]
    expected = worker.reference(**model_kwargs)
    for rank in range(WORLD):
        yardstick = _norm_err(result(runs, "fsdp2_root_mixed_precision", rank)["grads"],
                              worker.reference(**worker.SCENARIOS["fsdp2_root_mixed_precision"][1]))
        assert 1e-4 < yardstick < 0.05  # the premise: bf16 is at work, and not broken
        grads = result(runs, scenario, rank)["grads"]
        assert grads.keys() == expected.keys()
        assert _norm_err(grads, expected) <= 2 * yardstick + 2 ** -8, (scenario, rank)


@pytest.mark.parametrize("scenario", ["fsdp2_per_block_inverse"])
def test_fsdp2_units_inside_the_chain_forward_without_grad_and_inverse(runs, scenario):
    """After a training step, the chain's forward without grad matches an unwrapped model's, and
    inverse() rebuilds its input: each unit gathered around its calls there too."""
    for rank in range(WORLD):
        res = result(runs, scenario, rank)
        assert rel_err(res["output"], res["expected"]) <= 1e-6
        assert rel_err(res["inverse"], res["input"]) <= 1e-5


@pytest.mark.parametrize("scenario, words", [
    ("fsdp2_per_block_no_root", ["blocks[0]", "root", "fully_shard to the model holding the chain"]),
    ("fsdp2_unit_with_a_module_outside", ["blocks[0].f", "outside the reversible chain", "separately"]),
])
def test_fsdp2_units_the_chain_cannot_drive_are_refused_clearly(runs, scenario, words):
    """No root unit (FSDP2 would fail inside its reduce-scatter with an unrelated AttributeError),
    and a unit that also holds a module outside the chain (whose gathers the chain cannot order):
    refused before the chain runs, saying what to do instead."""
    for rank in range(WORLD):
        error = runs[rank][scenario].get("error")
        assert error is not None and error.startswith("RuntimeError"), error
        for word in words:
            assert word in error, error


@pytest.mark.parametrize("scenario", ["tp_colwise_rowwise", "tp_sequence_parallel_stream",
                                      "tp_megatron_sequence_parallel"])
def test_tensor_parallel_f_and_g_around_a_local_stream_give_single_process_gradients(runs, scenario):
    """The stream between blocks stays a plain local tensor; parallelism lives inside F and G.
    tp_colwise_rowwise: each rank the whole input, each MLP's Linears ColwiseParallel and
    RowwiseParallel (DTensor parameters; F and G take and return plain tensors).
    tp_sequence_parallel_stream: each rank its slice of the tokens, token-wise F and G with
    replicated parameters, parameter gradients summed over the ranks.
    tp_megatron_sequence_parallel: each rank its token slice, F and G gathering the tokens before
    their Colwise Linear and reduce-scattering them after their Rowwise one. Each parameter's full
    gradient, and each rank's input gradient (its slice), equal one process's on the whole input."""
    expected, expected_input = worker.tp_reference()
    for rank in range(WORLD):
        res = result(runs, scenario, rank)
        assert res["stream_types"] == ["Tensor"]
        assert res["grads"].keys() == expected.keys()
        for name, g in res["grads"].items():
            assert rel_err(g, expected[name]) <= 1e-5, (scenario, rank, name)
        if scenario != "tp_colwise_rowwise":
            expected_input = worker.tp_reference()[1].chunk(WORLD, dim=1)[rank]
        assert rel_err(res["input_grad"], expected_input) <= 1e-5, (scenario, rank)


def test_a_dtensor_stream_is_refused_clearly(runs):
    """The chain's own in-place ops have no sharding rules (DTensor fails inside them, and naive
    elementwise rules gave wrong gradients silently): a DTensor input is refused before anything
    runs, saying what to pass instead."""
    for rank in range(WORLD):
        error = runs[rank]["tp_dtensor_stream_refused"].get("error")
        assert error is not None and error.startswith("TypeError: input is a DTensor"), error
        for word in ["Replicate", "x.to_local()", "plain tensor", "inside F and G"]:
            assert word in error, error
