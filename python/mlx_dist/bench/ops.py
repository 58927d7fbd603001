"""``mlx-dist bench-ops``: what the ops of one batched decode step cost on
this device, for R rows (sequences) at once. Each op is chained once per
layer and the chain evaluated once, as a decode step runs, so launch and
synchronisation costs count as they do in a step.

Rows it prints, in microseconds per op:
- the step's quantized matmuls with the rows as ``[R, 1, K]`` (how a batch
  of sequences arrives) and as ``[R, K]`` (how the linear layers take it):
  MLX chooses its kernel from that shape;
- attention over the cache without a mask (rows at one position) and with
  the row mask that keeps each row to its own length;
- the cache write: a scatter of every row at its own position, against a
  ``slice_update`` of one row;
- rotary embeddings at one offset and at one offset per row.

It ends by checking that both matmul forms give the same values."""

from __future__ import annotations

import statistics
import time

import mlx.core as mx

from mlx_dist.bench.models import SHAPES


def _per_op(chain, layers: int, repeats: int) -> float:
    """Microseconds per op: `chain(layers)` evaluated once, median of
    `repeats` after two warm-up runs (the first compiles kernels)."""
    for _ in range(2):
        mx.eval(chain(layers))
    mx.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(chain(layers))
        mx.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / layers * 1e6


def _head_dim(shape: dict) -> int:
    return shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"])


def _matmuls(shape: dict, bits: int, group: int) -> dict:
    """The distinct `(K, N)` of a layer's projections, quantized."""
    hidden = shape["hidden_size"]
    head_dim = _head_dim(shape)
    out = {}
    for k, n in (
        (hidden, shape["num_attention_heads"] * head_dim),
        (hidden, shape["num_key_value_heads"] * head_dim),
        (hidden, shape["intermediate_size"]),
        (shape["intermediate_size"], hidden),
    ):
        w = mx.random.normal((n, k)).astype(mx.bfloat16)
        out[(k, n)] = mx.quantize(w, group_size=group, bits=bits)
    mx.eval(list(out.values()))
    return out


def measure(
    shape: dict,
    rows: list[int],
    bits: int = 8,
    group: int = 64,
    length: int = 300,
    layers: int = 28,
    repeats: int = 10,
) -> tuple[dict[str, dict[int, float]], float]:
    """`{op: {R: microseconds}}` and the largest difference between the
    two matmul forms' outputs."""
    weights = _matmuls(shape, bits, group)
    table: dict[str, dict[int, float]] = {}
    worst = 0.0
    for r in rows:
        figures, diff = _one_batch(
            shape, weights, r, max(rows), bits, group, length, layers, repeats
        )
        for name, us in figures.items():
            table.setdefault(name, {})[r] = us
        worst = max(worst, diff)
    return table, worst


def _one_batch(shape, weights, r, most, bits, group, length, layers, repeats):
    """`measure` for `r` rows: `{op: microseconds}` and the matmul forms'
    largest difference."""
    dt = mx.bfloat16
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = _head_dim(shape)
    figures = {}
    worst = 0.0

    def timed(name, chain):
        figures[name] = _per_op(chain, layers, repeats)

    for (k, n), (wq, sc, bi) in weights.items():

        def qmm(x, wq=wq, sc=sc, bi=bi):
            return mx.quantized_matmul(x, wq, sc, bi, transpose=True, group_size=group, bits=bits)

        x = mx.random.normal((r, 1, k)).astype(dt)
        flat = x.reshape(r, k)
        mx.eval(x, flat)
        timed(f"matmul {k}->{n} as [R,1,K]", lambda c, x=x, f=qmm: [f(x) for _ in range(c)])
        timed(f"matmul {k}->{n} as [R,K]", lambda c, x=flat, f=qmm: [f(x) for _ in range(c)])
        worst = max(worst, float(mx.abs(qmm(x).reshape(r, n) - qmm(flat)).max().item()))

    # Rows at positions length-1, length-8, ...: the mask keeps each to its own.
    pos = mx.array([max(0, length - 1 - 7 * i) for i in range(r)], dtype=mx.int32)
    mask = mx.arange(length)[None, None, None, :] <= pos[:, None, None, None]
    q = mx.random.normal((r, heads, 1, d)).astype(dt)
    cache = mx.random.normal((r, kv, length, d)).astype(dt)
    mx.eval(pos, mask, q, cache)

    def attend(c, m):
        out = q
        for _ in range(c):
            out = mx.fast.scaled_dot_product_attention(out, cache, cache, scale=d**-0.5, mask=m)
        return out

    timed("attention, no mask", lambda c: attend(c, None))
    timed("attention, row mask", lambda c: attend(c, mask))

    # One buffer per layer, as each layer has its own cache.
    bufs = [mx.zeros((most, kv, length + 1, d), dtype=dt) for _ in range(layers)]
    new = mx.random.normal((r, kv, 1, d)).astype(dt)
    slots = mx.arange(r)
    mx.eval(bufs, new, slots)

    def scatter(c):
        for i in range(c):
            bufs[i][slots, :, pos] = new.reshape(r, kv, d)
        return bufs[:c]

    def slice_update(c):
        for i in range(c):
            bufs[i][:1, :, length : length + 1] = new[:1]
        return bufs[:c]

    timed("cache write, scatter of R rows", scatter)
    timed("cache write, slice_update of 1 row", slice_update)

    def rope(c, offset):
        out = q
        for _ in range(c):
            out = mx.fast.rope(out, d, traditional=False, base=1e6, scale=1.0, offset=offset)
        return out

    timed("rope, one offset", lambda c: rope(c, length - 1))
    timed("rope, an offset per row", lambda c: rope(c, pos))
    return figures, worst


def main(args) -> int:
    shape = SHAPES[args.random_shape]
    rows = [int(r) for r in args.rows.split(",")]
    print(
        f"device: {mx.default_device()}  shape: {args.random_shape}  {args.bits}-bit  "
        f"{args.layers} of each op per evaluation, median of {args.repeats}, "
        f"keys and values of {args.length} positions"
    )
    table, worst = measure(
        shape, rows, bits=args.bits, length=args.length, layers=args.layers, repeats=args.repeats
    )
    width = max(len(name) for name in table)
    print(f"{'us per op':<{width}}" + "".join(f"{'R=' + str(r):>9}" for r in rows))
    for name, by_rows in table.items():
        print(f"{name:<{width}}" + "".join(f"{by_rows[r]:>9.1f}" for r in rows))
    same = "yes" if worst == 0.0 else "no"
    print(f"[R,1,K] and [R,K] give the same values: {same} (largest difference {worst})")
    return 0
