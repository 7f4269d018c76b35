# Source this to use podman the way optsel's container scripts and test do:
#   source scripts/container_env.sh && podman images
_optsel_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONTAINERS_CONF="$_optsel_root/scripts/containers/containers.conf"
export CONTAINERS_STORAGE_CONF="$_optsel_root/scripts/containers/storage.conf"
unset _optsel_root
