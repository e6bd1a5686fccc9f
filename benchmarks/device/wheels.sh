#!/usr/bin/env bash
# Here (any machine with PyPI): fetch the wheels the lent GPU machine lacks into .whl/ (git-ignored),
# for its Python 3.12, at the versions this checkout's .venv runs. The machine's image already holds
# numpy, tensorstore, h5py, httpx, psutil, torch, uvloop, pillow, tqdm, prometheus-client and the rest
# (the device tool's KINDS.md lists them); only what scancache adds travels (about 25 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
PACKAGES=(
    zarr numcodecs google-crc32c donfig
    dask distributed partd locket zict tblib tornado
    fastapi fastapi-offline starlette pydantic pydantic-core annotated-types typing-inspection
    opentelemetry-api importlib-metadata
    uvicorn httptools
    keras namex optree
    nibabel
)
version() { .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
rm -rf .whl && mkdir -p .whl
for name in "${PACKAGES[@]}"; do
    spec="$name==$(version "$name")"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 \
        -d .whl "$spec" 2> >(grep -v "is ignored" >&2) || { echo "wheels.sh: no Python 3.12 x86-64 wheel of $spec" >&2; exit 1; }
done
du -sh .whl
