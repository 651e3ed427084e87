"""The top entries of a py-spy raw profile (``py-spy record -f raw``): inclusive and self shares.

    python bench/pyspy_top.py profile.txt [--top 25] [--match NAME ...]
"""

from __future__ import annotations

import argparse
import collections
import re


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.profile, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            samples = int(count)
            total += samples
            # "function (path/file.py:line)" -> "function (file.py)"; one count per function per stack
            frames = [re.sub(r" \((?:.*/)?([^/]+?):\d+\)$", r" (\1)", frame) for frame in stack.split(";")]
            for frame in set(frames):
                inclusive[frame] += samples
            own[frames[-1]] += samples
    print(f"{total} samples")
    print("inclusive:")
    for frame, samples in inclusive.most_common(args.top):
        print(f"  {samples / total:6.1%}  {frame}")
    print("self:")
    for frame, samples in own.most_common(args.top):
        print(f"  {samples / total:6.1%}  {frame}")


if __name__ == "__main__":
    main()
