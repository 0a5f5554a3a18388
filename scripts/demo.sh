#!/usr/bin/env bash
# The main job end to end: a sample project, a branch, a mount, an "agent" that edits,
# creates and deletes files (and is refused a secret), the trash and the audit log, the
# branch's changes, proof the project is untouched, and a commit.
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTFS="$PWD/.venv/bin/agentfs"
DEMO=$(mktemp -d /tmp/agentfs-demo.XXXXXX)
export AGENTFS_HOME="$DEMO/home"
PROJECT="$DEMO/project"
MNT="$DEMO/mnt"
cleanup() {
    if grep -q " $MNT " /proc/mounts 2>/dev/null; then
        "$AGENTFS" umount "$MNT" >/dev/null 2>&1 || fusermount3 -uz "$MNT" || true
    fi
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "a sample project at $PROJECT"
mkdir -p "$PROJECT/src" "$PROJECT/docs" "$MNT"
cat > "$PROJECT/src/app.py" <<'PY'
def greet(name):
    return "Hello " + name

if __name__ == "__main__":
    print(greet("world"))
PY
printf '# Sample\n\nA tiny project.\n' > "$PROJECT/README.md"
printf 'old notes\n' > "$PROJECT/docs/notes.txt"
printf 'obsolete\n' > "$PROJECT/docs/old.txt"
printf 'API_TOKEN=s3cret\n' > "$PROJECT/.env"
mkdir -p "$PROJECT/scratch" && printf 'draft\n' > "$PROJECT/scratch/draft.md"
(cd "$PROJECT" && find . -type f | sort)

say "agentfs init, branch create, mount"
"$AGENTFS" init "$PROJECT"
cd "$PROJECT"   # the store is found from the current directory
"$AGENTFS" branch create agent-1
"$AGENTFS" mount "$MNT" --branch agent-1

say "the agent works in the mount"
(
    cd "$MNT"
    sed -i 's/"Hello " + name/f"Hello, {name}!"/' src/app.py     # edit
    printf 'def test_greet():\n    assert True\n' > src/test_app.py  # create
    rm docs/old.txt                                                  # delete
    mv docs/notes.txt docs/NOTES.md                                  # rename
    rm -rf scratch                                                   # a whole tree
    python3 src/app.py
    cat .env || echo "(the default policy keeps .env files out of reach)"
)

say "nothing deleted is lost: agentfs trash list, then restore the tree"
"$AGENTFS" trash list
"$AGENTFS" trash restore "$("$AGENTFS" trash list --json | python3 -c \
    'import json, sys; print([i["id"] for i in json.load(sys.stdin) if i["path"] == "scratch"][0])')"
cat "$MNT/scratch/draft.md"

say "what the agent did and what was refused: agentfs audit"
"$AGENTFS" audit tail -n 12
"$AGENTFS" audit tail --denied

say "what the branch changed: agentfs branch diff --stat, then the patch"
"$AGENTFS" branch diff agent-1 --stat
"$AGENTFS" branch diff agent-1 --color=never

say "agentfs status"
"$AGENTFS" status

say "unmount; the project itself is untouched"
"$AGENTFS" umount "$MNT"
(cd "$PROJECT" && find . -type f | sort && cat src/app.py)

say "remount: the branch still has the agent's work"
"$AGENTFS" mount "$MNT" --branch agent-1
(cd "$MNT" && find . -type f | sort)
"$AGENTFS" umount "$MNT"

say "commit the branch into the project (journaled; --dry-run first)"
"$AGENTFS" branch commit agent-1 --dry-run
"$AGENTFS" branch commit agent-1
(cd "$PROJECT" && find . -type f | sort && python3 src/app.py)
say "demo finished (files in $DEMO)"
