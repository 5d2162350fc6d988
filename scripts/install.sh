#!/usr/bin/env bash
# Install glm_rl and everything it needs on a fresh machine (CPU by default).
#  0. Debian packages the tests need: libibverbs1 (Mooncake P2P transfer engine), iproute2 (network namespaces),
#     openssh-server/-client (the launcher tests' loopback "hosts"). Installed when we are root and apt-get exists;
#     otherwise the exact apt-get command is printed and the install goes on (those tests then skip).
#  1. torch first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
#  2. megatron-core 0.19.2 without its Requires-Python check (it declares >=3.12 but runs on 3.11: see README).
#  3. the package itself, editable, with the test, P2P and logging (wandb, tensorboard) extras and what megatron-core
#     imports (triton, einops).
# GLM_RL_TORCH overrides the torch requirement (e.g. on a GPU machine with its own torch: GLM_RL_TORCH=skip).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libibverbs1 iproute2 openssh-server openssh-client)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null | grep -q '^ii' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${missing[*]}"
    (export DEBIAN_FRONTEND=noninteractive
     apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "warning: apt-get install ${missing[*]} failed; the tests that need them will skip"
  else
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo "
    echo "note: the tests need Debian packages missing here (on Debian/Ubuntu) and this script cannot install them;"
    echo "      run this, then re-run this script (the tests that need them skip until then):"
    echo "  ${sudo}apt-get update && ${sudo}apt-get install -y ${missing[*]}"
  fi
fi

PIP="python -m pip"
TORCH="${GLM_RL_TORCH:-torch==2.13.0}"
if [ "$TORCH" != "skip" ]; then $PIP install -q "$TORCH"; fi
$PIP install -q numpy "packaging>=24.2"
$PIP install -q --no-deps --ignore-requires-python megatron-core==0.19.2
$PIP install -q -e ".[test,p2p,megatron-cpu,logging]"
echo "glm_rl installed: $(command -v glm-rl)"
