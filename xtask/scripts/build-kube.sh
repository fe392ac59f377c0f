#!/usr/bin/env bash
# Builds Kubernetes v1.20.2 components offline from Debian bookworm's
# `kubernetes` source package (the full upstream tree with vendor/): the
# tests' real API server, and the real node's kubelet, controller-manager,
# scheduler and kube-proxy. Called by `cargo xtask setup` for the cached
# binaries that are missing.
#
#   build-kube.sh WORKDIR OUT COMPONENT...
#
# WORKDIR keeps the source and Go caches (about 1.5 GB); OUT gets the binaries.
# Needs golang-go, rsync and make (setup installs them). /etc/apt is left
# untouched: a private deb-src list is used.
set -euo pipefail
work=${1:?work directory}
out=${2:?output directory}
shift 2
components=("$@")
[ ${#components[@]} -gt 0 ] || components=(kube-apiserver)
mkdir -p "$work" "$out"
work=$(cd "$work" && pwd)
out=$(cd "$out" && pwd)

version=1.20.2
package=kubernetes=1.20.5+really1.20.2-1.1+deb12u1
tarball=kubernetes_1.20.5+really1.20.2.orig.tar.gz

step() { echo "build-kube: $*"; }

if [ ! -f "$work/$tarball" ]; then
  step "fetching Debian's kubernetes source package"
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -n1)
  mirror=${mirror:-http://deb.debian.org/debian}
  mkdir -p "$work/apt/parts" "$work/apt/lists/partial"
  cat > "$work/apt/parts/deb-src.sources" <<EOF
Types: deb-src
URIs: $mirror
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt_opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/apt/parts" -o "Dir::State::Lists=$work/apt/lists")
  apt-get "${apt_opts[@]}" update -q >/dev/null
  (cd "$work" && apt-get "${apt_opts[@]}" source --download-only "$package" >/dev/null 2>&1)
fi

src="$work/kubernetes-$version"
if [ ! -d "$src" ]; then
  step "unpacking"
  tar -C "$work" -xzf "$work/$tarball"
fi

# reflect2 1.0.1 (vendored in v1.20) iterates maps through runtime
# internals that changed in Go 1.18: with Debian's Go 1.19 the API server
# faults (SIGSEGV in mapiternext) the first time it encodes a custom
# resource. Debian's 1.0.2 is the upstream fix (Kubernetes 1.21+ vendor it).
reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -d "$reflect2" ] || { echo "build-kube: $reflect2 is missing (apt package golang-github-modern-go-reflect2-dev)" >&2; exit 1; }
if ! cmp -s "$reflect2/reflect2.go" "$src/vendor/github.com/modern-go/reflect2/reflect2.go"; then
  step "replacing the vendored reflect2 1.0.1 with Debian's 1.0.2"
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  mkdir -p "$src/vendor/github.com/modern-go/reflect2"
  find "$reflect2" -maxdepth 1 -name '*.go' ! -name '*_test.go' -exec cp {} "$src/vendor/github.com/modern-go/reflect2/" \;
fi

export GOPATH="$work/gopath" GOCACHE="$work/gocache" GOPROXY=off GO111MODULE=off CGO_ENABLED=0
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$src" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"

# The tarball lacks the generated OpenAPI definitions the API server needs.
if [ ! -s pkg/generated/openapi/zz_generated.openapi.go ]; then
  step "generating OpenAPI definitions (make gen_openapi)"
  rm -rf _output
  make gen_openapi >/dev/null 2>&1
fi

vendor=k8s.io/kubernetes/vendor/k8s.io
for c in "${components[@]}"; do
  step "compiling $c (1-3 minutes on 2 cores)"
  go build -o "$out/$c.tmp" -ldflags "-s -w \
    -X $vendor/component-base/version.gitVersion=v$version \
    -X $vendor/component-base/version.gitMajor=1 \
    -X $vendor/component-base/version.gitMinor=20 \
    -X $vendor/client-go/pkg/version.gitVersion=v$version" \
    "./cmd/$c"
  mv "$out/$c.tmp" "$out/$c"
  "$out/$c" --version
done
