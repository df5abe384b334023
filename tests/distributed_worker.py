"""One rank of the 2-process tests (run by tests/test_distributed.py, not by pytest).

Usage: python distributed_worker.py MODE RANK WORLD_SIZE INIT_FILE OUT_DIR [CKPT_IN] [CKPT_OUT]

``ddp``: every registry optimizer trains STEPS steps on its share of each global batch
under DistributedDataParallel (gloo); rank 0 saves the final parameters per optimizer.
``fsdp``: the same under FSDP2 (``fully_shard`` per block and at the root), on a model
whose attention heads and norm blocks straddle the two shards; rank 0 saves the full
parameters and every rank the bytes of its optimizer state. Then, per optimizer, a run with a
NaN in one gradient element held by the last rank (NONFINITE), and runs with
``skip_nonfinite=True`` (NONFINITE_SKIP); rank 0 saves every parameter and state tensor.
``dcp``: FSDP2 with a ``torch.distributed.checkpoint`` round trip: load CKPT_IN (or, if
empty, train the first STEPS // 2 steps), save CKPT_OUT (if given), train the remaining
steps; rank 0 saves the final parameters. World sizes 2 -> 1 -> 2 test resharding.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(__file__))

import leanopt  # noqa: E402
from leanopt.registry import state_bytes  # noqa: E402
from helpers import batch, tiny_model  # noqa: E402
from test_battery import CASES  # noqa: E402

STEPS = 6  # the DCP tests save after 3, mid-period, and the next 3 cross PMA's large step (period 4); 10 cost the suite ~100 s
GLOBAL_BATCH = 12  # divides by 1, 2, 3 and 4 data-parallel ranks
# 3 heads of 8 rows and 24-element norms: split 12/12 over two ranks, the middle head
# and every norm block straddle the shards. float64, so that comparisons see the math and
# not the order of float32 gradient reductions (torch's own AdamW differs by 1.7e-5 after
# 10 float32 steps under FSDP2)
# The vocabulary (97, tied embeddings) and the MLP (45 neurons) do not divide by 2: uneven shards.
STRADDLING = dict(dim=24, n_heads=3, n_kv_heads=3, vocab_size=97, mlp_hidden=45, tie_embeddings=True, dtype=torch.float64)
# dimensions that do not divide by 2 or 3 ranks: a 97-token vocabulary (tied embeddings), 5 query
# heads of 4 rows over 1 key/value head (20 rows: 10/10 and 7/7/6, heads straddle; the key
# projection's 4 rows leave the third rank empty), an MLP of 45 neurons, biases (on q, k, v, o
# and the MLP: 20, 4, 4, 20 and 45 elements, split as the rows are)
UNEVEN = dict(vocab_size=97, dim=20, n_heads=5, n_kv_heads=1, mlp_hidden=45, tie_embeddings=True, bias=True,
              dtype=torch.float64)
# tensor parallelism splits heads and neurons evenly over 2 ranks; FSDP's dim 0 stays uneven (97)
TP_MODEL = dict(vocab_size=97, dim=24, n_heads=4, n_kv_heads=2, mlp_hidden=46, tie_embeddings=True, dtype=torch.float64)
DCP_OPTIMIZERS = ["adam-mini", "sgd-sai", "alpha-adam", "cadamw", "lion", "adamw-pma", "lion-pma", "alpha-adam-int4"]
FSDP_UNSUPPORTED = {"adafactor"}  # torch.optim.Adafactor itself fails on DTensor parameters
# GPT-2's Conv1D weights alone: column blocks with no row layout beside them
GPT2_ONLY = {"adam-mini+mask-columns": ("adam-mini", {"mask": "async", "alpha": "root", "columns_only": True})}
# the mask component (whole-tensor sums) on optimizers whose default leaves it off
VARIANTS = {**GPT2_ONLY, "adam-mini+mask": ("adam-mini", {"mask": "async", "alpha": "root"}),
            "sgd-sai+mask": ("sgd-sai", {"mask": "async"}),
            "lion+mask": ("lion", {"mask": "sync"}), "sgd-sai-released": ("sgd-sai", {"variant": "released"}),
            # adam-mini's own call form (parameter names with dim / n_heads) and its name rules given the model
            "adam-mini-names": ("adam-mini", {"named": True}), "adam-mini-partition-names": ("adam-mini", {"partition": "names"})}
RUNS = leanopt.list_optimizers() + [v for v in VARIANTS if v not in GPT2_ONLY]
# compact state under DDP (replicated parameters: every rank quantizes the same averaged step)
# (every matrix quantized -- vectors of under 64 elements stay full, as FSDP2 splits them along the rows
# blocks run along --; blocks of 4: rows of 45 end in a ragged block, TP's 12 columns of o_proj per rank
# are whole blocks. Its 23 of down_proj are not, and TP would keep them full: down_proj is a full-precision
# param group on every layout, as a user moving checkpoints between TP and other layouts would set it)
PRECISION_RUNS = {"adam-mini-int8": ("adam-mini", {"state_precision": "int8", "state_min_size": 64, "state_block_size": 4}),
                  "alpha-adam-int4": ("alpha-adam", {"state_precision": "int4", "state_min_size": 64, "state_block_size": 4}),
                  "sgd-sai-bf16": ("sgd-sai", {"state_precision": "bf16"}),
                  "lion-pure-bf16": ("lion", {"stochastic_rounding": True})}
FAST_ON_SHARDS = ["lion", "sgd-sai", "adamw-pma", "lion-pma"]  # elementwise steps (no mask): the C kernels on each shard
# a statistic across the shards (Adam-mini's blocks in both call forms, the mask's sums, the count
# scale's whole size): C passes on each shard around one collective (leanopt._backend.SHARDED)
SHARDED_C = ["adam-mini", "adam-mini-names", "adam-mini+mask", "alpha-adam", "cadamw", "lion+mask", "sgd-sai+mask"]
# the compiled kernels take the same shards (CUDA's path): checked on the CPU with the C kernels off
COMPILED_ON_SHARDS = ["adam-mini+mask", "alpha-adam"]  # the Adam-mini kernel's "given" rows; two_pass's sums across ranks
# torch's own are not ours to test; compact state: blocks run along rows, so each rank codes its
# own rows (a tensor split along its rows, TP's Shard(1), keeps full precision)
SHARDED_RUNS = [r for r in RUNS if r not in ("adamw", "sgd", "adafactor")] + ["adam-mini-int8", "alpha-adam-int4"]
# (compact state: a Shard(1) tensor whose ranks do not hold whole blocks keeps full precision, so
# the compact runs of those splits are not the one process's)
PLACED_RUNS = [r for r in SHARDED_RUNS if r not in PRECISION_RUNS]
# a NaN at the first step after two clean ones, in a row of the second rank that belongs to a head
# straddling the shards (rows 8-15 of 24): Adam-mini's block sum and the mask's sums cross ranks
NONFINITE = [r for r in RUNS if r not in ("adamw", "sgd", "adafactor")]
NONFINITE_SKIP = ["alpha-adam", "adam-mini"]
BAD_PARAM, BAD_ELEMENT, BAD_STEP = "layers.0.self_attn.k_proj.weight", (13, 3), 2


def gpt2_model(dtype: torch.dtype):
    """transformers' GPT-2, whose Conv1D weights store (in, out): Adam-mini's blocks are runs of
    columns (heads of 4 and neurons), which FSDP2's row split cuts on every rank; 20 and 80 rows,
    a vocabulary of 97, over 3 ranks: 7/7/6, 27/27/26 and 33/32/32 rows."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=20, n_layer=1, n_head=5, vocab_size=97, n_positions=16, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).to(dtype)


def build(run: str, wrap: str, world: int, opt_kw: dict | None = None, seed: int | None = None, **overrides):
    """The model of ``overrides``, wrapped by ``wrap`` ("ddp", "fsdp", "tp": tensor parallel
    attention and MLP, "2d": TP inside FSDP2 on a (world/2, 2) mesh, or none), and its optimizer
    (built after ``torch.manual_seed(seed)`` when ``seed`` is given)."""
    name, extra = {**VARIANTS, **PRECISION_RUNS}.get(run, (run, {}))
    extra = {**extra, **(opt_kw or {})}
    named = extra.pop("named", False)
    columns_only = extra.pop("columns_only", False)
    model = gpt2_model(overrides.get("dtype", torch.float32)) if overrides.pop("gpt2", False) else tiny_model(**overrides)
    if wrap == "ddp" and world > 1:
        wrapped = DDP(model)
    elif wrap in ("fsdp", "tp", "2d"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if wrap == "2d":
            mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
            dp, tp = mesh["dp"], mesh["tp"]
        else:
            dp = tp = init_device_mesh("cpu", (world,))
        if wrap != "fsdp":
            tensor_parallel(model, tp)
        if wrap != "tp":
            for block in getattr(model, "layers", None) or model.transformer.h:
                fully_shard(block, mesh=dp)
            fully_shard(model, mesh=dp)
        wrapped = model
    else:
        wrapped = model
    if seed is not None:
        torch.manual_seed(seed)
    return model, wrapped, optimizer(run, model, wrapped, extra, named, columns_only)


def optimizer(run: str, model, wrapped, extra: dict, named: bool, columns_only: bool = False):
    """The optimizer of ``run`` (a registry name, a VARIANTS or PRECISION_RUNS entry) over
    ``wrapped``'s parameters, with ``extra`` arguments (``named``: adam-mini's call form;
    ``columns_only``: Adam-mini over GPT-2's Conv1D weights alone)."""
    name = {**VARIANTS, **PRECISION_RUNS}.get(run, (run, {}))[0]
    cfg = model.config
    if extra.get("partition") == "names" or named:
        extra.update(dim=cfg.dim, n_heads=cfg.n_heads, n_kv_heads=cfg.resolved_kv_heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if run in PRECISION_RUNS and "state_block_size" in extra:
            every = list(model.named_parameters())
            groups = [{"params": [(n, p) for n, p in every if "down_proj" not in n]},
                      {"params": [(n, p) for n, p in every if "down_proj" in n], "state_precision": "param"}]
            kw = {"lr": CASES[name].lr, **CASES[name].kwargs, **extra}
            opt = leanopt.AdamMini(groups, model=model, **kw) if name == "adam-mini" else leanopt.create_optimizer(name, groups, **kw)
        elif columns_only:
            conv = [(n, p) for n, p in model.named_parameters() if ".c_" in n and n.endswith(".weight")]
            opt = leanopt.AdamMini(conv, model=model, lr=CASES[name].lr, **CASES[name].kwargs, **extra)
        elif named:
            opt = leanopt.AdamMini(wrapped.named_parameters(), lr=CASES[name].lr, **CASES[name].kwargs, **extra)
        else:
            opt = leanopt.create_optimizer(name, wrapped, lr=CASES[name].lr, **CASES[name].kwargs, **extra)
    return opt


def placed_by_hand(run: str, world: int, model_kw: dict) -> dict[str, torch.Tensor]:
    """Tensor parallelism as the optimizer sees it, on splits no parallel style can run
    (``UNEVEN`` over 3 ranks: 7/7/6 query rows, 2/2/0 key rows, 7/7/6 output columns):
    the parameters become DTensors placed as Megatron's plan places them -- q/k/v, gate/up
    and their biases ``Shard(0)``, o/down ``Shard(1)`` with ``Replicate`` biases, the tied
    embedding ``Shard(1)``, norms ``Replicate`` -- and every step's gradients are a plain
    replica's, computed on the whole batch and placed alike. Returns the final parameters."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    model, replica = tiny_model(**model_kw), tiny_model(**model_kw)

    def placement(name: str, p: torch.Tensor):
        if any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            return Shard(0)
        if any(k in name for k in ("o_proj", "down_proj")):
            return Shard(1) if p.dim() == 2 else Replicate()
        return Shard(1) if "embed_tokens" in name else Replicate()

    places = {}
    for mod_name, module in model.named_modules():
        for p_name, p in list(module.named_parameters(recurse=False)):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            places[full] = [placement(full, p)]
            setattr(module, p_name, nn.Parameter(distribute_tensor(p.detach(), mesh, places[full])))
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    name, extra = {**VARIANTS, **PRECISION_RUNS}.get(run, (run, {}))
    extra = dict(extra)
    opt = optimizer(run, model, model, extra, extra.pop("named", False))
    params, plain = dict(model.named_parameters()), dict(replica.named_parameters())
    for step in range(STEPS):
        x, y = batch(step, size=GLOBAL_BATCH)
        replica.zero_grad(set_to_none=True)
        replica(x, y)[1].backward()
        for n, p in params.items():
            p.grad = distribute_tensor(plain[n].grad, mesh, places[n])
        opt.step()
        with torch.no_grad():
            for n, p in params.items():
                plain[n].copy_(p.full_tensor())
    return full_state(replica)


def partial_error() -> str:
    """What a Partial (pending-sum) parameter gets from an optimizer: its error message."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    w = torch.nn.Parameter(DTensor.from_local(torch.ones(4, 3), mesh, [Partial()]))
    w.grad = DTensor.from_local(torch.ones(4, 3), mesh, [Partial()])
    opt = leanopt.AlphaAdam([("pending.weight", w)])
    try:
        opt.step()
    except ValueError as e:
        return str(e)
    return "no error"


def fsdp1_errors() -> dict[str, str]:
    """What FSDP1 models get from an optimizer (flat parameters, then use_orig_params=True)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    out = {}
    for orig in (False, True):
        model = FullyShardedDataParallel(tiny_model(), use_orig_params=orig, device_id=torch.device("cpu"))
        try:
            leanopt.create_optimizer("adam-mini", model)
            out[f"fsdp1-orig-{orig}"] = "no error"
        except ValueError as e:
            out[f"fsdp1-orig-{orig}"] = str(e)
    return out


def tensor_parallel(model, mesh) -> None:
    """Megatron-style: q/k/v and gate/up column-wise (Shard(0) weights), o and down row-wise
    (Shard(1): every output neuron's row straddles the ranks); each rank runs its heads."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        block.self_attn.n_heads //= mesh.size()
        block.self_attn.n_kv_heads //= mesh.size()
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            replicate(norm, mesh)


def replicate(module, mesh) -> None:
    """``module``'s parameters as Replicate() DTensors over ``mesh``, its activations plain."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    distribute_module(module, mesh, input_fn=lambda mod, inputs, m: tuple(DTensor.from_local(x, m, [Replicate()]) for x in inputs),
                      output_fn=lambda mod, out, m: out.to_local())


def run_steps(wrapped, opt, steps, rank, world, first=0, inject=None) -> int:
    """Train; returns the number of collectives of the last ``opt.step()``. ``inject(step)``
    runs after each backward."""
    from torch.distributed.tensor.debug import CommDebugMode

    share = GLOBAL_BATCH // world  # world, rank: of the data-parallel dimension
    for step in range(first, first + steps):
        x, y = batch(step, size=GLOBAL_BATCH)
        opt.zero_grad(set_to_none=True)
        wrapped(x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])[1].backward()
        if inject is not None:
            inject(step)
        with CommDebugMode() as comm:
            opt.step()
    return comm.get_total_counts()


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}


def train(name: str, rank: int = 0, world: int = 1, wrap: str = "ddp", **overrides) -> dict[str, torch.Tensor]:
    model, wrapped, opt = build(name, wrap, world, **overrides)
    run_steps(wrapped, opt, STEPS, rank, world)
    return full_state(model)


def nonfinite(run: str, rank: int = 0, world: int = 1, wrap: str = "ddp", skip: bool = False):
    """Two clean steps, then one with a NaN at BAD_ELEMENT of BAD_PARAM's gradient (the last:
    a forward pass through the NaN parameter would make every gradient NaN): every parameter
    and state tensor (whole), and the count of skipped parameter steps."""
    model, wrapped, opt = build(run, wrap, world, {"skip_nonfinite": True} if skip else None, **STRADDLING)
    target = dict(model.named_parameters())[BAD_PARAM]

    def inject(step):
        if step != BAD_STEP:
            return
        grad = target.grad
        if not hasattr(grad, "to_local"):
            grad[BAD_ELEMENT] = float("nan")
            return
        local = grad.to_local()  # this rank's rows: torch.chunk's split of dim 0
        start = -(-grad.shape[0] // world) * rank
        row = BAD_ELEMENT[0] - start
        if 0 <= row < local.shape[0]:
            local[row, BAD_ELEMENT[1]] = float("nan")

    run_steps(wrapped, opt, BAD_STEP + 1, rank, world, inject=inject)
    out = {}
    for n, p in model.named_parameters():
        out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and k != "step":
                out[f"{n}/{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out, opt.nonfinite_skips


def train_all(names, wrap, world, model_kw, rank, dp_rank, dp_world, out) -> None:
    """Train every run of ``names``; rank 0 saves each one's full parameters and the first
    one's placements; every rank its state bytes and the collectives of its last step."""
    sizes, collectives = {}, {}
    for name in names:
        model, wrapped, opt = build(name, wrap, world, **model_kw)
        if rank == 0 and name == names[0]:  # what the layouts really were
            with open(os.path.join(out, "placements.json"), "w") as f:
                json.dump({n: [repr(pl) for pl in p.placements] if hasattr(p, "placements") else None
                           for n, p in model.named_parameters()}, f)
        collectives[name] = run_steps(wrapped, opt, STEPS, dp_rank, dp_world)
        state = full_state(model)
        sizes[name] = state_bytes(opt)  # this rank's shards
        if rank == 0:
            torch.save(state, os.path.join(out, f"{name}.pt"))
    with open(os.path.join(out, f"state_bytes_rank{rank}.json"), "w") as f:
        json.dump(sizes, f)
    with open(os.path.join(out, f"collectives_rank{rank}.json"), "w") as f:
        json.dump(collectives, f)


def fast_on_shards(names, wrap, world, model_kw, rank, dp_rank, dp_world, out, fast=None, file="fast.json") -> None:
    """float32: each run of ``names`` with ``fused=fast`` (the default: the C kernels on the
    local shards) and with the eager reference (fused=False), from the same start and the same
    gradients -- a fixed random stream, placed as each parameter is, so that a rounding
    difference cannot feed back through a loss (a masked step's φ would amplify it); rank 0
    saves which backends stepped the tensors, the largest relative parameter difference and
    the collectives of the last step in fast.json."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    from leanopt._distributed import piece_of

    def place(full, p):
        if not isinstance(p, DTensor):
            return full
        part = full
        for d, index in enumerate(piece_of(p).index):
            if index is not None:
                part = part.index_select(d, index)
        return DTensor.from_local(part.contiguous(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

    results = {}
    for name in names:
        finals = {}
        for fused in (fast, False):
            model, wrapped, opt = build(name, wrap, world, {"fused": fused}, **{**model_kw, "dtype": torch.float32})
            gen = torch.Generator().manual_seed(1)
            for _ in range(STEPS):
                for p in model.parameters():
                    p.grad = place(torch.randn(p.shape, generator=gen) * 1e-2, p)
                with CommDebugMode() as comm:
                    opt.step()
            finals[fused] = (full_state(model), dict(opt.last_backends), comm.get_total_counts())
        diff = max(((finals[fast][0][k] - v).norm() / v.norm()).item() for k, v in finals[False][0].items())
        results[name] = {"backends": finals[fast][1], "eager_backends": finals[False][1], "diff": diff,
                         "collectives": finals[fast][2], "eager_collectives": finals[False][2]}
    if rank == 0:
        with open(os.path.join(out, file), "w") as f:
            json.dump(results, f)


def dcp_round(name, rank, world, ckpt_in, ckpt_out, out, wrap="fsdp", model_kw=STRADDLING):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    model, wrapped, opt = build(name, wrap, world, **model_kw)
    dp_rank, dp_world = {"tp": (0, 1), "2d": (rank // 2, world // 2)}.get(wrap, (rank, world))
    if ckpt_in:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=os.path.join(ckpt_in, name))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
    else:
        run_steps(wrapped, opt, STEPS // 2, dp_rank, dp_world)
    if ckpt_out:
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=os.path.join(ckpt_out, name))
    run_steps(wrapped, opt, STEPS - STEPS // 2, dp_rank, dp_world, first=STEPS // 2)
    state = full_state(model)
    if rank == 0:
        torch.save(state, os.path.join(out, f"{name}.pt"))


if __name__ == "__main__":
    mode, rank, world, init_file, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if mode == "compiled":  # (launched with LEANOPT_NATIVE=0) the compiled kernels on shards, as on CUDA
            fast_on_shards(COMPILED_ON_SHARDS, "fsdp", world, UNEVEN, rank, rank, world, out, fast=True)
            # Conv1D's column blocks, each cut by the row split: the "given-columns" kind
            fast_on_shards(["adam-mini+mask"], "fsdp", world, {"gpt2": True}, rank, rank, world, out, fast=True,
                           file="fast-gpt2.json")
        elif mode == "placed":
            finals = {name: placed_by_hand(name, world, UNEVEN) for name in PLACED_RUNS}
            if rank == 0:
                torch.save(finals, os.path.join(out, "placed.pt"))
        elif mode in ("uneven", "tp", "2d"):
            wrap, model_kw = ("fsdp", UNEVEN) if mode == "uneven" else (mode, TP_MODEL)
            dp_rank, dp_world = {"uneven": (rank, world), "tp": (0, 1), "2d": (rank // 2, world // 2)}[mode]
            train_all(SHARDED_RUNS, wrap, world, model_kw, rank, dp_rank, dp_world, out)
            fast_on_shards(SHARDED_C, wrap, world, model_kw, rank, dp_rank, dp_world, out)
            if mode == "uneven":  # Conv1D's column blocks, each cut by the row split (with the mask: its sums too)
                fast_on_shards(["adam-mini", "adam-mini+mask", "adam-mini+mask-columns"], "fsdp", world, {"gpt2": True},
                               rank, rank, world, out, file="fast-gpt2.json")
            if mode == "tp":
                errors = {"partial": partial_error(), **fsdp1_errors()}
                if rank == 0:
                    with open(os.path.join(out, "refused.json"), "w") as f:
                        json.dump(errors, f)
        elif mode == "dcp":
            ckpt_in, ckpt_out = (sys.argv[6] or None), (sys.argv[7] or None)
            wrap, shapes = (sys.argv[8], sys.argv[9]) if len(sys.argv) > 8 else ("fsdp", "straddling")
            model_kw = {"straddling": STRADDLING, "uneven": UNEVEN, "tp": TP_MODEL}[shapes]
            for name in DCP_OPTIMIZERS:
                dcp_round(name, rank, world, ckpt_in, ckpt_out, out, wrap, model_kw)
        else:
            names = [n for n in RUNS if not (mode == "fsdp" and n in FSDP_UNSUPPORTED)]
            names += ["adam-mini-int8", "alpha-adam-int4"] if mode == "fsdp" else []
            train_all(names, mode, world, STRADDLING if mode == "fsdp" else {"dtype": torch.float64}, rank, rank, world, out)
            if mode == "ddp":
                for name in PRECISION_RUNS:
                    # pure bf16 with a torch seed per rank, as users often set: the replicas
                    # must still draw the same rounding bits (the optimizer agrees on rank 0's)
                    pure = name == "lion-pure-bf16"
                    model, wrapped, opt = build(name, "ddp", world, seed=rank if pure else None,
                                                dtype=torch.bfloat16 if pure else torch.float64)
                    run_steps(wrapped, opt, STEPS, rank, world)
                    if pure or rank == 0:
                        torch.save(full_state(model), os.path.join(out, f"{name}-rank{rank}.pt"))
            if mode == "fsdp":
                fast_on_shards(FAST_ON_SHARDS + SHARDED_C, "fsdp", world, STRADDLING, rank, rank, world, out)
            if mode == "fsdp":
                skips = {}
                for name, skip in [(n, False) for n in NONFINITE] + [(n, True) for n in NONFINITE_SKIP]:
                    state, skips[f"{name}-{skip}"] = nonfinite(name, rank, world, "fsdp", skip)
                    if rank == 0:
                        torch.save(state, os.path.join(out, f"nonfinite-{name}-{skip}.pt"))
                with open(os.path.join(out, f"nonfinite_skips_rank{rank}.json"), "w") as f:
                    json.dump(skips, f)
        dist.barrier()  # no rank tears down gloo while another still talks to it
    finally:
        dist.destroy_process_group()
    # Everything is written and closed. Skip the interpreter's teardown: under load, a
    # c10d/gloo thread still joinable when C++ statics are destroyed has once aborted a worker
    # that had finished ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
