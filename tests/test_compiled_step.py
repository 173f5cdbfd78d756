"""The compiled training step (train.compile, docs/training.md "The compiled step") against the eager one.

For every task the trainer runs, :class:`puzzlecam.tasks.StepModule` (input preparation, the network's passes,
the loss terms) compiles with ``fullgraph=True`` into exactly one graph, and gives the eager step's losses and
every parameter gradient, with the C++ loss ops where the task has them (``ops_backend=auto`` on CPU). A new
alpha each step does not recompile. The fast tests compile with ``aot_eager`` (dynamo + AOT autograd: the
graph capture, the fake kernels and the autograd of our ops; no code generation); one slow test runs Inductor,
whose C++ builds take minutes on 2 cores. The slow Trainer test runs 4 steps eager and compiled through real
DeepSpeed with a NaN step in the middle: the same losses, the same skipped step, the same weights.
"""

from __future__ import annotations

import pytest
import torch
from test_train_support import max_param_diff, metrics, python_launch, run_all, tiny_overrides, tiny_shards, weights
from torch._dynamo.backends.registry import lookup_backend

from puzzlecam.config import load_config
from puzzlecam.tasks import StepModule, build_task
from puzzlecam.train import compile_options

CPU = torch.device("cpu")
TASKS = {
    "puzzle": ["model.arch=resnet18", "model.width=8", "model.norm=train", "puzzle.conf_weight=0.5"],
    "puzzle_cam_level": ["model.arch=resnet18", "model.width=8", "puzzle.level=cam", "puzzle.kind=l2"],
    "baseline": ["model.arch=resnet18", "model.width=8", "train.mode=baseline"],
    "affinity": ["task=affinity", "model.arch=resnet18", "model.width=8", "affinity.radius=5"],
    "segmentation": [
        "task=segmentation",
        "model.arch=resnet18",
        "model.width=8",
        "model.norm=frozen",
        "model.num_classes=21",
        "segmentation.head_channels=8",
        "segmentation.low_level_channels=8",
        "segmentation.dropout=false",
    ],
}


def random_batch(size: int, batch_size: int, seed: int) -> dict:
    """A loader-shaped batch: uint8 images, valid regions, 1-3 labels per image, label maps (255 outside)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(batch_size, 20)
    for b in range(batch_size):
        labels[b, torch.randperm(20, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))]] = 1.0
    valid = torch.randint(size // 2, size + 1, (batch_size, 2), generator=g)
    label = torch.randint(0, 21, (batch_size, size, size), generator=g)
    for b, (h, w) in enumerate(valid.tolist()):
        label[b, h:], label[b, :, w:] = 255, 255
    image = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=g)
    return {"image": image, "valid": valid, "labels": labels, "label": label}


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them with ``aot_eager``."""

    def __init__(self, inner: str = "aot_eager"):
        self.graphs = 0
        self.inner = lookup_backend(inner)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def step_and_grads(task, step, network, batch, alpha, device=CPU):
    losses = task.losses(step, batch, {"alpha": alpha}, device)
    network.zero_grad(set_to_none=True)
    losses.total.backward()
    grads = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
    return [v.detach() for v in losses], grads


def compare(eager, compiled, what: str) -> None:
    (eager_losses, eager_grads), (got_losses, got_grads) = eager, compiled
    for i, (a, b) in enumerate(zip(got_losses, eager_losses, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"{what}: loss term {i}: {m}")
    assert got_grads.keys() == eager_grads.keys(), what
    for name, g in eager_grads.items():
        scale = g.abs().max().item()  # relative to the tensor's largest gradient (sums in another order)
        torch.testing.assert_close(
            got_grads[name], g, rtol=1e-4, atol=1e-4 * scale + 1e-8, msg=lambda m, n=name: f"{what}: grad {n}: {m}"
        )


def build(name: str, size: int):
    cfg = load_config(None, [*TASKS[name], f"data.crop_size={size}"])
    task = build_task(cfg)
    torch.manual_seed(0)
    return cfg, task, task.build_network()


@pytest.mark.parametrize("name", list(TASKS))
def test_the_whole_step_is_one_graph_and_matches_eager(name):
    size = 64
    cfg, task, network = build(name, size)
    # DeepLabv3+'s GroupNorm of the ASPP's pooled 1x1 features normalizes nearly constant inputs: fp32 rounding
    # differs by ~1% of its gradient between AOT autograd's decomposition and the native kernel. In float64 the
    # two agree to 1e-12: compare that task there.
    dtype = torch.float64 if name == "segmentation" else torch.float32
    network = network.to(dtype)
    step = StepModule(task, network, dtype, channels_last=False)
    backend = CountingBackend()
    compiled = StepModule(task, network, dtype, channels_last=False)
    compiled.compile_step(backend, **compile_options(cfg.train))
    for i, alpha in enumerate((0.5, 1.75)):
        batch = random_batch(size, 4, seed=i)
        buffers = {k: v.clone() for k, v in network.state_dict().items()}
        eager = step_and_grads(task, step, network, batch, alpha)
        network.load_state_dict(buffers)  # the compiled pass starts from the same BatchNorm statistics
        got = step_and_grads(task, compiled, network, batch, alpha)
        compare(eager, got, f"{name} step {i}")
    assert backend.graphs == 1, f"{name}: {backend.graphs} graphs (a graph break, or a recompile for a new alpha)"


@pytest.mark.slow
def test_the_step_compiled_by_inductor_matches_eager():
    size = 64
    cfg, task, network = build("puzzle", size)
    assert cfg.train.ops_backend == "auto"  # on CPU: the C++ reconstruction loss inside the compiled graph
    step = StepModule(task, network, torch.float32, channels_last=False)
    compiled = StepModule(task, network, torch.float32, channels_last=False)
    compiled.compile_step("inductor", **compile_options(cfg.train))
    batch = random_batch(size, 4, seed=3)
    buffers = {k: v.clone() for k, v in network.state_dict().items()}
    eager = step_and_grads(task, step, network, batch, 2.0)
    network.load_state_dict(buffers)
    compare(eager, step_and_grads(task, compiled, network, batch, 2.0), "inductor")


@pytest.mark.slow
def test_trainer_compiled_run_equals_eager_run_and_skips_a_nan_step(tmp_path):
    shards = tiny_shards(tmp_path / "data")
    runs = {}
    launches = []
    for mode in ("eager", "compiled"):
        run_dir = tmp_path / mode
        over = tiny_overrides(shards, **{"train.max_steps": 4, "model.norm": "train", "train.ckpt_every": 4})
        if mode == "compiled":
            over += ["train.compile=true", "train.compile_backend=aot_eager"]
        launches.append(python_launch(run_dir, over, tmp_path / f"{mode}.log", env={"PUZZLECAM_FAULT_NAN": "step=2"}))
        runs[mode] = run_dir
    run_all(launches, timeout=600)
    eager, compiled = (metrics(runs[m]) for m in ("eager", "compiled"))
    assert [r["step"] for r in compiled] == [1, 2, 3, 4]
    assert [r["bad_step"] for r in compiled] == [False, False, True, False]  # step 3 met the NaN and was skipped
    assert compiled[-1]["skipped_steps"] == 1
    for a, b in zip(compiled, eager, strict=True):
        for key in ("loss", "loss_cls", "loss_pcls", "loss_re"):
            if b[key] is None:
                assert a[key] is None, (key, a, b)
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a["step"], a[key], b[key])
    assert max_param_diff(weights(runs["compiled"]), weights(runs["eager"])) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["puzzle", "affinity", "segmentation"])
def test_the_step_on_a_gpu_with_triton_ops_inductor_and_cuda_graphs(name):
    """The fused Triton ops inside Inductor's graph, replayed as CUDA graphs, against the eager step (fp32,
    TF32 off; Inductor's fusions sum in another order: 1e-3 of each tensor's largest value)."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    cfg, task, network = build(name, 64)
    cfg.train.cuda_graphs = True
    network = network.to(device)
    step = StepModule(task, network, torch.float32, channels_last=False)
    compiled = StepModule(task, network, torch.float32, channels_last=False)
    compiled.compile_step("inductor", **compile_options(cfg.train))
    for i in range(3):  # capture, then replays
        batch = {k: v.to(device) for k, v in random_batch(64, 4, seed=i).items()}
        buffers = {k: v.clone() for k, v in network.state_dict().items()}
        eager_losses, eager_grads = step_and_grads(task, step, network, batch, 1.0, device)
        network.load_state_dict(buffers)
        torch.compiler.cudagraph_mark_step_begin()
        got_losses, got_grads = step_and_grads(task, compiled, network, batch, 1.0, device)
        for a, b in zip(got_losses, eager_losses, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
        for key, g in eager_grads.items():
            scale = g.abs().max().item()
            torch.testing.assert_close(got_grads[key], g, rtol=1e-3, atol=1e-3 * scale + 1e-7, msg=key)


def test_cuda_graphs_settings_are_refused_where_they_cannot_apply():
    from puzzlecam.config import validate_for_run
    from puzzlecam.errors import ConfigError

    def run_config(*overrides):
        return load_config(None, ["train.global_batch_size=32", "train.micro_batch_size=32", *overrides])

    with pytest.raises(ConfigError, match="train.cuda_graphs=true captures the compiled step: set train.compile=true"):
        validate_for_run(run_config("train.cuda_graphs=true"), 1, cuda_available=True)
    with pytest.raises(ConfigError, match="train.cuda_graphs=true needs a CUDA GPU"):
        validate_for_run(run_config("train.cuda_graphs=true", "train.compile=true"), 1, cuda_available=False)
    with pytest.raises(ConfigError, match="set train.compile_backend=inductor .*aot_eager"):
        validate_for_run(
            run_config("train.cuda_graphs=true", "train.compile=true", "train.compile_backend=aot_eager"), 1, True
        )
    options = compile_options(run_config("train.cuda_graphs=true", "train.compile=true").train)
    assert options == {"fullgraph": True, "dynamic": False, "mode": "reduce-overhead"}
    validate_for_run(run_config("train.cuda_graphs=true", "train.compile=true"), 1, cuda_available=True)
