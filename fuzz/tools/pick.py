#!/usr/bin/env python3
"""Picks the committed corpus of a target from a libFuzzer merge control file
(`-merge=1 -merge_control_file=FILE`): the inputs that added new coverage edges (its `COV`
lines; libFuzzer tries inputs smallest first), within a byte budget, copied into OUT_DIR
under their SHA-1.

    fuzz/tools/pick.py CONTROL_FILE OUT_DIR BUDGET_BYTES
"""
import hashlib
import os
import shutil
import sys


def main():
    control, out, budget, seeds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    seeds = os.path.abspath(seeds)
    lines = open(control).read().split("\n")
    n = int(lines[0])
    files = lines[2:2 + n]
    os.makedirs(out, exist_ok=True)
    used = 0
    for line in lines:
        parts = line.split()
        if len(parts) < 3 or parts[0] != "COV":
            continue
        path = files[int(parts[1])]
        if os.path.dirname(os.path.abspath(path)) == seeds:
            continue
        size = os.path.getsize(path)
        if used + size > budget:
            continue
        used += size
        with open(path, "rb") as f:
            name = hashlib.sha1(f.read()).hexdigest()
        shutil.copyfile(path, os.path.join(out, name))


if __name__ == "__main__":
    main()
