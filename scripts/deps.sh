# Shared by the scripts: root check and the Debian packages Causeway's lab
# and tests use. Sourced, not run.

# Debian package for each command we need.
CAUSEWAY_PACKAGES=(
    ip:iproute2
    nft:nftables
    iperf3:iperf3
    wg:wireguard-tools
    wireguard-go:wireguard-go
    ethtool:ethtool
    conntrack:conntrack
    turnserver:coturn
    keepalived:keepalived
    # A real NAT-PMP / PCP server on a lab NAT router (tests/e2e/nat.rs).
    miniupnpd:miniupnpd-nftables
    # The image test (tests/e2e/image.rs, scripts/build-image.sh).
    buildah:buildah
    runc:runc
)

ensure_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "$0: needs root (network namespaces, TUN devices, nftables); run it with sudo" >&2
        exit 1
    fi
}

ensure_packages() {
    ensure_commands "${CAUSEWAY_PACKAGES[@]}"
}

# ensure_commands CMD:PACKAGE...: installs the packages of the commands
# that are missing.
ensure_commands() {
    local missing=() entry
    for entry in "$@"; do
        command -v "${entry%%:*}" >/dev/null 2>&1 || missing+=("${entry#*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}
