# Source this file (`source scripts/env.sh`) to build and run densebert4ret
# against the libtorch that ships inside the project's Python environment.

DB4R_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DB4R_ROOT
export DB4R_VENV="${DB4R_VENV:-$DB4R_ROOT/.venv}"
export DB4R_ARTIFACTS="${DB4R_ARTIFACTS:-$DB4R_ROOT/artifacts}"

if [ -x "$DB4R_VENV/bin/python" ]; then
    LIBTORCH="$("$DB4R_VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)"
    export LIBTORCH
    export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PATH="$DB4R_VENV/bin:$PATH"
else
    echo "scripts/env.sh: no Python environment at $DB4R_VENV; run scripts/setup.sh first" >&2
fi
