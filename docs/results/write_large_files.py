"""Lists a bundle's model files over the model zoo's 25 MB limit in its large_files.yml.

    .venv/bin/python docs/results/write_large_files.py bundles/echo_lv_crf

Each entry has the file's path, sha256 and an empty url (the file is in this repository); the
model zoo's tooling reads the same layout (``large_files: [{path, url, hash_val,
hash_type}]``). A bundle with no such file gets no large_files.yml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.data.hashing import sha256_file
from pipeline.data.writers import atomic_write_text

LIMIT = 25 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    bundle = Path(parser.parse_args().bundle)
    large = sorted(p for p in (bundle / "models").glob("*.pt") if p.stat().st_size > LIMIT)
    target = bundle / "large_files.yml"
    if not large:
        target.unlink(missing_ok=True)
        print(f"{bundle}: no model file over 25 MiB")
        return
    lines = ["# Model files over the model zoo's 25 MB limit (half precision, sha256-checked).",
             "large_files:"]
    for path in large:
        lines += [f'  - path: "{path.relative_to(bundle).as_posix()}"', '    url: ""',
                  f'    hash_val: "{sha256_file(path)}"', '    hash_type: "sha256"']
    atomic_write_text(target, "\n".join(lines) + "\n")
    print(f"wrote {target}: {len(large)} file(s)")


if __name__ == "__main__":
    main()
