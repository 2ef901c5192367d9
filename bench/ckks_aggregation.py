"""Encrypted aggregation cost: CKKS sums against the plaintext floor (BENCHMARKS.md section 2).

K silos each upload P parameters in the `[a_k * w, a_k, 1]` layout (P + 2 values). For
each P we measure, as medians of repeats in this one run (the machine is shared, so
compare ratios, not absolute seconds):

  plaintext_sum_s    float32 FedAvg sum of K arrays already received (the floor)
  client_encrypt_s   one silo: encrypt + serialise its update (policies.ckks.encrypt_vector)
  coordinator_sum_s  the coordinator: K uint8 blobs as Flower delivers them -> one uint8 sum
                     ready to send (deserialise + add + serialise), per method:
                     "tenseal" (reference) and "numpy-residue" (adds RNS residues directly)
  bytes_per_param    upload bytes per model parameter
  max_abs_error      decrypted sum against the float64 plaintext sum

Also compares symmetric and asymmetric (public-key) TenSEAL encryption, and copies the
NVIDIA FLARE reference numbers from BENCHMARKS.md. Writes bench/results/ckks_aggregation.json
(and .png when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tenseal as ts
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policies import ckks  # noqa: E402
from policies.update import pack_update  # noqa: E402

OUT = ROOT / "bench" / "results" / "ckks_aggregation.json"
METHODS = ("tenseal", "numpy-residue")
REAL_MODEL_P = 14  # Linear(13, 1): 13 weights + bias

REFERENCE = {
    "source": "copied from /work/shared/BENCHMARKS.md section 2 (measured there with tenseal 0.3.18, not in this run)",
    "plaintext_float32": {"P": 1_000_000, "K": 16, "bytes_per_param": 4.0, "ns_per_param_per_silo": 0.35,
                          "sum_s": 0.0057},
    "nvidia_flare_2_9_default": {
        "scheme": "CKKS", "poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40,
        "keys": "symmetric, shared by all clients; context copy (664 KB) per layer",
        "server_op": "add, then multiply by 1/sum(n)",
        "P": 1_000_000, "K": 16, "layers": 1, "bytes_per_param": 58, "client_encrypt_s": 0.602,
        "server_s": 2.690, "max_abs_error": 4.7e-8,
        "bytes_per_param_20_layers": {"P=1M": 74, "P=100k": 227},
        "server_time_share_rebuilding_context": "69-91%",
    },
    "depth0_tenseal_design": {
        "poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 49], "scale_bits": 40,
        "P": 1_000_000, "K": 16, "bytes_per_param": 32, "client_encrypt_s": 0.369,
        "coordinator_s": 0.464, "max_abs_error": 2.7e-9, "ratio_to_plaintext": "55-92x",
    },
    "targets": {"coordinator_ratio_to_plaintext_max": 20, "bytes_per_param_max": 32,
                "at": "P=1M, K=16 (BENCHMARKS.md section 4)"},
}


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def contributions(p: int, k: int, seed: int) -> list[np.ndarray]:
    """K realistic updates `[a_k * w, a_k, 1]` with a_k in (0, 1]."""
    rng = np.random.default_rng(seed)
    return [pack_update(rng.normal(0.0, 0.5, p), float(rng.uniform(0.05, 1.0))) for _ in range(k)]


def plaintext_sum(arrays: list[np.ndarray]) -> np.ndarray:
    """What a coordinator without encryption does with K float32 arrays."""
    acc = arrays[0].copy()
    for a in arrays[1:]:
        acc += a
    return acc


def encrypt_all(ctx: ts.Context, params: ckks.CkksParams, vecs: list[np.ndarray]) -> tuple[list[bytes], list[float]]:
    blobs, times = [], []
    for v in vecs:
        start = time.perf_counter()
        blobs.append(ckks.encrypt_vector(ctx, v, params=params))
        times.append(time.perf_counter() - start)
    return blobs, times


def measure(p: int, k: int, repeats: int, ctx: ts.Context, agg: ts.Context, params: ckks.CkksParams,
            progress: Progress) -> list[dict]:
    """One (P, K) point: both coordinator methods share the same encrypted uploads."""
    task = progress.add_task(f"P={p:,} K={k}", total=3 + 2 * repeats)
    vecs = contributions(p, k, seed=p + k)
    f32 = [v.astype(np.float32) for v in vecs]
    plain_s = median_time(lambda: plaintext_sum(f32), max(repeats, 21))
    progress.advance(task)
    blobs, enc_times = encrypt_all(ctx, params, vecs)
    progress.advance(task)
    arrays = [ckks.blob_as_uint8(b) for b in blobs]  # what Flower hands the coordinator
    expected = np.sum(vecs, axis=0)
    rows = []
    for method in METHODS:
        summed = ckks.sum_encrypted_uint8(agg, arrays, method=method)
        error = float(np.max(np.abs(ckks.decrypt_vector(ctx, summed) - expected)))
        coord_s = median_time(lambda: ckks.sum_encrypted_uint8(agg, arrays, method=method), repeats)
        progress.advance(task, repeats)
        rows.append({
            "P": p, "K": k, "values": p + 2, "plaintext_sum_s": plain_s,
            "client_encrypt_s": statistics.median(enc_times), "coordinator_sum_s": coord_s,
            "bytes_per_param": len(blobs[0]) / p, "upload_bytes": len(blobs[0]), "max_abs_error": error,
            "ratio_to_plaintext": coord_s / plain_s, "method": method, "repeats": repeats,
        })
    progress.advance(task)
    return rows


def encryption_types(p: int, params: ckks.CkksParams, repeats: int) -> dict:
    """Symmetric vs public-key encryption at the silo: time, wire size, secret size."""
    vec = contributions(p, 1, seed=1)[0]
    out = {}
    for name, kind in (("symmetric", ts.ENCRYPTION_TYPE.SYMMETRIC), ("asymmetric", ts.ENCRYPTION_TYPE.ASYMMETRIC)):
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes), encryption_type=kind)
        ctx.global_scale = 2.0 ** params.scale_bits
        blob = ckks.encrypt_vector(ctx, vec, params=params)
        error = float(np.max(np.abs(ckks.decrypt_vector(ctx, blob) - vec)))
        out[name] = {
            "P": p, "client_encrypt_s": median_time(lambda: ckks.encrypt_vector(ctx, vec, params=params), repeats),
            "bytes_per_param": len(blob) / p, "max_abs_error_single": error,
            "secret_context_bytes": len(ckks.secret_context_bytes(ctx)),
            "aggregator_context_bytes": len(ckks.aggregator_context_bytes(ctx)),
        }
    out["chosen"] = "symmetric" if ckks.ENCRYPTION_TYPE == ts.ENCRYPTION_TYPE.SYMMETRIC else "asymmetric"
    out["note"] = ("TenSEAL 0.3.18 serialises symmetric ciphertexts unseeded, so both upload the same bytes; "
                   "symmetric is chosen for speed, lower noise and a 3x smaller sealed secret")
    return out


def print_table(console: Console, rows: list[dict]) -> None:
    table = Table(title="CKKS aggregation vs plaintext FedAvg (medians, this run)")
    for col in ("P", "K", "method", "plaintext ms", "client enc ms", "coordinator ms", "ratio", "B/param", "max err"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in rows:
        table.add_row(f"{r['P']:,}", str(r["K"]), r["method"], f"{r['plaintext_sum_s'] * 1e3:.3f}",
                      f"{r['client_encrypt_s'] * 1e3:.1f}", f"{r['coordinator_sum_s'] * 1e3:.1f}",
                      f"{r['ratio_to_plaintext']:.1f}x", f"{r['bytes_per_param']:.2f}", f"{r['max_abs_error']:.1e}")
    console.print(table)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = sorted({r["P"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for j, method in enumerate(METHODS):
        ratios = [next(r["ratio_to_plaintext"] for r in rows if r["P"] == p and r["method"] == method) for p in sizes]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(sizes))], ratios, width, label=method)
        ax.bar_label(bars, labels=[f"{x:.0f}x" for x in ratios], fontsize=8)
    ax.axhline(20, color="black", linestyle="--", linewidth=1, label="target 20x (P=1M)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1)
    ax.set_xticks(range(len(sizes)), [f"P={p:,}" for p in sizes])
    ax.set_ylabel("coordinator sum / plaintext float32 sum")
    ax.set_title(f"CKKS sum cost, K={rows[0]['K']} silos (N=4096, [60, 49], 2^40)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="repeats per timing (median)")
    parser.add_argument("--sizes", default=f"{REAL_MODEL_P},100000,1000000")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    console = Console(width=max(Console().width, 120))  # the table is wider than a pipe's 80
    params = ckks.CkksParams()
    ctx = ckks.new_secret_context(params)
    agg = ckks.load_context(ckks.aggregator_context_bytes(ctx), params)
    rows: list[dict] = []
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        for p in (int(s) for s in args.sizes.split(",")):
            rows += measure(p, args.silos, args.repeats, ctx, agg, params, progress)
        task = progress.add_task("symmetric vs asymmetric, P=100,000", total=1)
        kinds = encryption_types(100_000, params, args.repeats)
        progress.advance(task)
    result = {
        "params": {**params.model_dump(), "encryption_type": kinds["chosen"], "slots": ckks.slots(params),
                   "headroom": ckks.headroom(params), "per_silo_bound": ckks.per_silo_bound(params),
                   "layout": "[a_k * w, a_k, 1]: P + 2 values per upload", "silos": args.silos,
                   "coordinator_io": "uint8 arrays in (as Flower delivers them), uint8 array out",
                   "tenseal": ts.__version__, "numpy": np.__version__, "python": platform.python_version(),
                   "cores": 2, "wall_s": round(time.perf_counter() - started, 1)},
        "rows": rows,
        "encryption_types": kinds,
        "reference": REFERENCE,
        "generated_by": "bench/ckks_aggregation.py",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(console, rows)
    for name in ("symmetric", "asymmetric"):
        k = kinds[name]
        console.print(f"{name:10s} encrypt {k['client_encrypt_s'] * 1e3:.1f} ms at P=100k, {k['bytes_per_param']:.2f} B/param, "
                      f"secret context {k['secret_context_bytes']:,} B, aggregator context {k['aggregator_context_bytes']} B")
    if plot(rows, out.with_suffix(".png")):
        console.print(f"plot: {out.with_suffix('.png')}")
    console.print(f"wrote {out} in {result['params']['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
