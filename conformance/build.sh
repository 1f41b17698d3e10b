#!/usr/bin/env bash
# Build the third-party conformance suites once, outside the checkout:
#   conformance/build.sh SUITES CACHE
# SUITES holds the pristine tarballs (xfstests-<commit>.tar.gz, pjdfstest-<commit>.tar.gz;
# see SUITES/README.md). Each suite is built into CACHE/<suite>-<commit>[-<patch hash>]/
# and only when that directory is missing, so a second run costs nothing; a changed
# patch gets a directory of its own. Prints "NAME=DIR" for each suite on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
suites=${1:?usage: build.sh SUITES CACHE}
cache=${2:?usage: build.sh SUITES CACHE}

tarball() {  # the one tarball of suite $1, or a clear failure
    local found=("$suites"/"$1"-*.tar.gz)
    if [ ! -f "${found[0]}" ]; then
        echo "conformance: no $1-*.tar.gz in SUITES=$suites (set SUITES=DIR to the directory" \
             "holding the pristine suite tarballs, by default ../shared/suites)" >&2
        exit 2
    fi
    echo "${found[0]}"
}

# build NAME TARBALL PATCH COMMAND...: unpack into a temporary directory beside the
# final one, patch, run the build command in it, then rename (a failed build leaves
# nothing that looks built).
build() {
    local name=$1 tar=$2 patch=$3; shift 3
    local commit key dir
    commit=$(basename "$tar" .tar.gz); commit=${commit#"$name"-}
    key=$name-$commit
    [ -z "$patch" ] || key=$key-$(sha256sum "$patch" | cut -c1-8)
    dir=$cache/$key
    if [ ! -e "$dir/.built" ]; then
        echo "conformance: building $key in $dir" >&2
        mkdir -p "$cache"
        rm -rf "$dir.tmp" "$dir"
        mkdir "$dir.tmp"
        tar xzf "$tar" -C "$dir.tmp" --strip-components=1
        [ -z "$patch" ] || patch -d "$dir.tmp" -p1 --quiet < "$patch"
        # The suites build in place and record their own path (xfstests' configure):
        # build under the final name.
        mv "$dir.tmp" "$dir"
        if ! (cd "$dir" && "$@") > "$dir.log" 2>&1; then
            tail -n 40 "$dir.log" >&2
            echo "conformance: building $key failed (log: $dir.log)" >&2
            rm -rf "$dir"
            exit 1
        fi
        touch "$dir/.built"
    fi
    echo "$name=$dir"
}

pjdfstest_tar=$(tarball pjdfstest)
xfstests_tar=$(tarball xfstests)
jobs=$(nproc)
# pjdfstest: autotools, one binary (pjdfstest) plus the prove(1) test scripts in tests/.
build pjdfstest "$pjdfstest_tar" "" \
    bash -c 'autoreconf -ifs && ./configure && make'
# xfstests in full (it builds ltp/fsx too); patched so that a FUSE file system whose
# "device" is a plain directory can be mounted, recognised and emptied (see the patch).
build xfstests "$xfstests_tar" "$here/xfstests-fuse-dir.patch" \
    make -j"$jobs"

# The users xfstests runs commands as.
for user in fsgqa fsgqa2 123456-fsgqa; do
    id "$user" >/dev/null 2>&1 || useradd --create-home "$user"
done
