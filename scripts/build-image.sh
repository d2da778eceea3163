#!/usr/bin/env bash
# Builds the causeway image with buildah *from scratch*: no base image is
# pulled (this machine reaches no registry). The image has what the
# Containerfile's runtime stage has, made from this host's files instead of
# gcr.io/distroless/cc-debian12:
#
#   /usr/local/bin/causeway          the binary (release build by default)
#   the shared libraries it links    as `ldd` lists them (glibc, libgcc_s, the loader)
#   /etc/passwd, /etc/group          root and nonroot (65532), as in distroless
#   /etc/nsswitch.conf               host names from /etc/hosts, then DNS
#   /tmp (1777), /home/nonroot
#   ENTRYPOINT /usr/local/bin/causeway, CMD --help, USER 65532:65532,
#   EXPOSE 51820/udp 7443/udp 3478/udp 9469/tcp, the same labels
#
# With --with-nft, /usr/sbin/nft and its libraries are added too (for a
# node agent that programs nftables; the gateway does not need it).
#
# Usage:
#   scripts/build-image.sh [--binary PATH] [--tag NAME] [--with-nft]
#                          [--root DIR --runroot DIR] [--archive FILE]
#
#   --binary PATH   the causeway binary to put in (default: build
#                   target/release/causeway with cargo)
#   --tag NAME      image name (default: localhost/causeway:<version>)
#   --root, --runroot
#                   buildah's storage (default: the system's); the tests use
#                   a temporary one so that they leave nothing behind
#   --archive FILE  also write the image as an OCI archive (for
#                   `skopeo copy oci-archive:FILE docker://registry/...` or
#                   `ctr -n k8s.io images import`)
#
# Prints the image id on stdout. Needs root (buildah's storage) and
# installs buildah with apt-get when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ensure_root

binary=""
tag=""
with_nft=0
archive=""
storage=()
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        --with-nft) with_nft=1; shift ;;
        --root|--runroot) storage+=("$1" "$2"); shift 2 ;;
        --archive) archive=$2; shift 2 ;;
        *) echo "$0: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
    esac
done

ensure_commands buildah:buildah
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
tag=${tag:-localhost/causeway:$version}
if [ -z "$binary" ]; then
    cargo build --release --locked -p causeway --bin causeway >&2
    binary=target/release/causeway
fi
[ -x "$binary" ] || { echo "$0: $binary is not an executable" >&2; exit 1; }

# vfs: works everywhere (also inside a container or on a file system
# without overlay support), at the cost of a copy per layer; the image is
# one small layer.
bah() { buildah --storage-driver vfs "${storage[@]}" "$@"; }

ctr=$(bah from scratch)
cleanup() { bah rm "$ctr" >/dev/null 2>&1 || true; }
trap cleanup EXIT
root=$(bah mount "$ctr")

# The binary and every shared object it (and nft) loads, at the paths the
# loader looks for them; symlinks resolved to the files they name.
copy_with_libraries() {
    local exe=$1 dest=$2 lib
    install -D -m 0755 "$exe" "$root$dest"
    for lib in $(ldd "$exe" | grep -o '/[^ ]*'); do
        [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
}
copy_with_libraries "$binary" /usr/local/bin/causeway
if [ "$with_nft" = 1 ]; then
    ensure_commands nft:nftables
    copy_with_libraries "$(command -v nft)" /usr/sbin/nft
fi

install -d -m 0755 "$root/etc" "$root/home" "$root/run" "$root/var/lib"
install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
install -d -m 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    > "$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"

bah config \
    --entrypoint '["/usr/local/bin/causeway"]' \
    --cmd '--help' \
    --user 65532:65532 \
    --port 51820/udp --port 7443/udp --port 3478/udp --port 9469/tcp \
    --label org.opencontainers.image.title=causeway \
    --label "org.opencontainers.image.description=Cluster-to-cluster WireGuard overlay: site gateway and rendezvous" \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    --label "org.opencontainers.image.version=$version" \
    "$ctr"
bah umount "$ctr" >/dev/null
id=$(bah commit --quiet "$ctr" "$tag")
if [ -n "$archive" ]; then
    bah push --quiet "$tag" "oci-archive:$archive:$tag" >&2
fi
echo "$id"
