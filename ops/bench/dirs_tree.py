#!/usr/bin/env python3
"""Helper of ops/bench/dirs.sh: deterministic benchmark trees, the 1% rewrite, and the table.

  dirs_tree.py gen A|B DIR [--scale F] [--seed N]   generate tree A or B (idempotent)
  dirs_tree.py mutate DIR FRACTION [--seed N]        rewrite FRACTION of the files
  dirs_tree.py table RESULTS.tsv                     print the comparison table

Tree A: 100k files of 1-16 KiB, uniform (about 0.8 GB).
Tree B: 10k files of 1 KiB-1 MiB, log-uniform (about 1.4 GB).
Files sit 100 to a directory, directories 100 to a parent (d000/d00/f00000.bin).
Content is pseudo-random (seeded), so it does not compress and is the same on every run.
"""
import math
import os
import random
import statistics
import sys

TREES = {
    # name: (files, min size, max size, log-uniform)
    "A": (100_000, 1024, 16 * 1024, False),
    "B": (10_000, 1024, 1024 * 1024, True),
}


def size_of(rng, lo, hi, log):
    if log:
        return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return rng.randint(lo, hi)


def rel_path(i):
    return f"d{i // 10000:03d}/d{(i // 100) % 100:02d}/f{i:06d}.bin"


def gen(tree, root, scale, seed):
    n, lo, hi, log = TREES[tree]
    n = max(1, int(n * scale))
    stamp = root.rstrip("/") + ".complete"
    want = f"{tree} {n} {seed}\n"
    if os.path.exists(stamp) and open(stamp).read() == want:
        print(f"tree {tree}: {root} already generated", file=sys.stderr)
        return
    rng = random.Random(f"{seed}-{tree}")
    total = 0
    for i in range(n):
        path = os.path.join(root, rel_path(i))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        size = size_of(rng, lo, hi, log)
        with open(path, "wb") as f:
            f.write(rng.randbytes(size))
        total += size
    # The stamp lives beside the tree, not in it, so it is not mirrored; `mutate` removes it.
    open(stamp, "w").write(want)
    print(f"tree {tree}: {n} files, {total / 1e9:.2f} GB in {root}", file=sys.stderr)


def files_of(root):
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            out.append(os.path.join(d, f))
    return out


def mutate(root, fraction, seed):
    stamp = root.rstrip("/") + ".complete"
    if os.path.exists(stamp):
        os.remove(stamp)
    files = files_of(root)
    rng = random.Random(f"{seed}-mutate-{root}")
    chosen = rng.sample(files, max(1, int(len(files) * fraction)))
    total = 0
    for path in chosen:
        size = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(rng.randbytes(size))
        total += size
    print(f"rewrote {len(chosen)} of {len(files)} files ({total / 1e6:.1f} MB)", file=sys.stderr)


def table(results):
    """Medians per (tree, phase, tool) over the runs in `results`, with the range of wall
    times when there was more than one run."""
    rows = [line.rstrip("\n").split("\t") for line in open(results) if line.strip()]
    # tree phase tool wall user sys rss_kb ok [run]
    groups = {}
    for r in rows:
        tree, phase, tool, wall, user, sys_, rss, ok = r[:8]
        g = groups.setdefault((tree, phase, tool), {"wall": [], "cpu": [], "rss": [], "ok": set()})
        g["wall"].append(float(wall))
        g["cpu"].append(float(user) + float(sys_))
        g["rss"].append(int(rss))
        g["ok"].add(ok)
    runs = max(len(g["wall"]) for g in groups.values())
    med = lambda xs: statistics.median(xs)
    # The peers: rsync -a and rclone sync. `rsync-fsync` (rsync made durable, as
    # tidemark's syncs are) is shown for reference and is not a peer.
    best = {}
    for (tree, phase, tool), g in groups.items():
        if tool in ("rsync", "rclone"):
            best[(tree, phase)] = min(best.get((tree, phase), float("inf")), med(g["wall"]))
    rng = "  wall range" if runs > 1 else ""
    print(f"{'tree':<5}{'phase':<13}{'tool':<14}{'wall s':>9}{'cpu s':>9}{'peak RSS MB':>13}  {'target = source':<15} {'vs faster peer':>14}{rng}")
    for (tree, phase, tool), g in groups.items():
        wall = med(g["wall"])
        ratio = ""
        if tool.startswith("tidemark") and best.get((tree, phase), 0) > 0:
            ratio = f"{wall / best[(tree, phase)]:.2f}x"
        ok = "/".join(sorted(g["ok"]))
        spread = f"  {min(g['wall']):.2f}-{max(g['wall']):.2f}" if runs > 1 else ""
        print(f"{tree:<5}{phase:<13}{tool:<14}{wall:>9.2f}{med(g['cpu']):>9.2f}{max(g['rss']) / 1024:>13.1f}  {ok:<15} {ratio:>14}{spread}")
    if runs > 1:
        print(f"(medians of {runs} runs; peak RSS is the largest of them)")


def main(argv):
    args = argv[1:]

    def opt(name, default, cast):
        if name in args:
            i = args.index(name)
            v = cast(args[i + 1])
            del args[i : i + 2]
            return v
        return default

    scale = opt("--scale", 1.0, float)
    seed = opt("--seed", 42, int)
    cmd = args[0]
    if cmd == "gen":
        gen(args[1], args[2], scale, seed)
    elif cmd == "mutate":
        mutate(args[1], float(args[2]), seed)
    elif cmd == "table":
        table(args[1])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
