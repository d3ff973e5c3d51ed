#!/usr/bin/env bash
# Install tether from this checkout: a venv under PREFIX, the commands in
# /usr/local/bin, /etc/tether/tether.toml, the systemd unit, tmpfiles.d, and
# for podman its hooks.d files; or take that out again (--uninstall).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: packaging/install.sh [--runtime runc|podman|both] [--force] [--no-apt] [--dry-run]
       packaging/install.sh --uninstall [--force]

Installs tether (as root, from a checkout) for the runtime you use:
  runc     apt: python3 python3-venv python3-iptables iptables nftables conntrack runc
  podman   the same, plus podman (podman runs its containers with runc here:
           with both in one install, apt keeps runc), and podman's hooks.d
           files, written by `tether oci hooks-dir`
  both     runc and podman (the same as podman)
The default is podman when podman is installed, else runc. Only missing
packages are installed. No compiler: python-iptables comes from Debian
(python3-iptables), so the venv sees the system's site-packages.

Writes: PREFIX/venv (default /opt/tether), symlinks tether, tether-fused,
tether-hook in /usr/local/bin, /etc/tether/tether.toml (only if missing),
/etc/systemd/system/tether-fused.service, /etc/tmpfiles.d/tether.conf.
A unit or tmpfiles file you changed is never overwritten: ours is written
beside it as FILE.tether-new, and a line says so (--force replaces yours,
keeping it as FILE.tether-old).

  --runtime R    runc, podman or both (default: see above)
  --no-apt       install no packages (also TETHER_SKIP_APT=1); say what is missing
  --dry-run      print the packages and files it would install, change nothing
  --force        replace files you changed; with --uninstall, also remove them,
                 and go on while tether still runs from PREFIX
  --uninstall    remove what this script installed; keep /etc/tether/tether.toml
                 and the state directory (/var/lib/tether), saying so
  --deps-from V  take the Python dependencies from the venv V (its site-packages,
                 same Python version) instead of PyPI: for tests and development
  -h, --help     this text

Environment: PREFIX (default /opt/tether); ROOT (default empty): a directory
every path above is put under, so that a test can install without touching
the system (e.g. ROOT=/tmp/x: /tmp/x/etc/tether/tether.toml, /tmp/x/opt/tether);
PYTHON (default /usr/bin/python3, Debian's, which sees python3-iptables).
EOF
}

die() { echo "install.sh: $*" >&2; exit 2; }

runtime="" uninstall=0 force=0 dry=0 deps_from=""
apt=1
[ "${TETHER_SKIP_APT:-}" = 1 ] && apt=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --runtime) [ $# -ge 2 ] || die "--runtime needs a value: runc, podman or both"; runtime=$2; shift ;;
    --runtime=*) runtime=${1#--runtime=} ;;
    --uninstall) uninstall=1 ;;
    --force) force=1 ;;
    --no-apt) apt=0 ;;
    --dry-run) dry=1 ;;
    --deps-from) [ $# -ge 2 ] || die "--deps-from needs a venv directory"; deps_from=$2; shift ;;
    --deps-from=*) deps_from=${1#--deps-from=} ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done
case "$runtime" in
  "") if command -v podman >/dev/null 2>&1; then runtime=podman; else runtime=runc; fi ;;
  runc|podman|both) ;;
  *) die "--runtime $runtime: choose runc, podman or both" ;;
esac

src=$(cd "$(dirname "$0")/.." && pwd)
root=${ROOT:-}
root=${root%/}
prefix=${PREFIX:-/opt/tether}
python=${PYTHON:-/usr/bin/python3}
P=$root$prefix                                   # the prefix as this script sees it
venv=$P/venv
sums=$P/installed.sha256                         # what install.sh wrote last time, to tell your changes from ours
conf=/etc/tether/tether.toml
unit=/etc/systemd/system/tether-fused.service
tmpfiles=/etc/tmpfiles.d/tether.conf
bindir=/usr/local/bin
commands="tether tether-fused tether-hook"
hooks_dirs="/usr/share/containers/oci/hooks.d /etc/containers/oci/hooks.d"  # podman 4 reads the first
hook_files="tether-createruntime.json tether-poststop.json"
systemd_up() { [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
recorded() { [ -f "$sums" ] || return 0; awk -v p="$1" '$2 == p { print $1 }' "$sums" | tail -n1; }
running() {  # pids of processes started from this venv (tether-fused, the file server)
  local d pids=""
  for d in /proc/[0-9]*; do
    case "$(tr '\0' ' ' 2>/dev/null < "$d/cmdline")" in *"$venv/"*) pids="$pids ${d#/proc/}" ;; esac
  done
  echo "${pids# }"
}

# --- uninstall -----------------------------------------------------------------------
if [ "$uninstall" = 1 ]; then
  if systemd_up && [ -e "$unit" ]; then
    systemctl disable --now tether-fused >/dev/null 2>&1 && echo "stopped and disabled tether-fused.service"
  fi
  pids=$(running)
  if [ -n "$pids" ] && [ "$force" = 0 ]; then
    echo "install.sh: tether still runs from $venv (pid $pids): containers' served files depend on it;" >&2
    echo "  take it down first: $bindir/tether-fused --config $conf --cleanup   (or --force to uninstall anyway)" >&2
    exit 1
  fi
  # and wherever podman's containers.conf points (hooks_dir), as tether finds it
  if [ -z "$root" ] && [ -x "$venv/bin/python" ]; then
    for d in $("$venv/bin/python" -c 'from fused import podman; print(*podman.hooks_dirs())' 2>/dev/null || true); do
      case " $hooks_dirs " in *" $d "*) ;; *) hooks_dirs="$hooks_dirs $d" ;; esac
    done
  fi
  for d in $hooks_dirs; do
    for f in $hook_files; do
      h=$root$d/$f
      [ -e "$h" ] || continue
      if grep -qF -- "\"$venv/bin/tether-hook\"" "$h"; then
        rm -f "$h" && echo "removed $h"
      else
        echo "kept $h (it runs another tether-hook)"
      fi
    done
  done
  for c in $commands; do
    l=$root$bindir/$c
    if [ -L "$l" ]; then
      case "$(readlink "$l")" in
        "$P"/*) rm -f "$l" && echo "removed $l" ;;
        *) echo "kept $l (points to $(readlink "$l"), not into $prefix)" ;;
      esac
    elif [ -e "$l" ]; then
      echo "kept $l (not a symlink into $prefix)"
    fi
  done
  for pair in "$unit:$src/packaging/tether-fused.service" "$tmpfiles:$src/packaging/tether.tmpfiles.conf"; do
    f=$root${pair%%:*} ours=${pair#*:}
    [ -e "$f.tether-new" ] && rm -f "$f.tether-new" && echo "removed $f.tether-new"
    [ -e "$f" ] || continue
    if cmp -s "$f" "$ours" || [ "$(sha "$f")" = "$(recorded "${pair%%:*}")" ] || [ "$force" = 1 ]; then
      rm -f "$f" && echo "removed $f"
    else
      echo "kept $f (changed since install.sh wrote it; --force removes it)"
    fi
  done
  systemd_up && systemctl daemon-reload 2>/dev/null || true
  if [ -d "$venv" ]; then
    rm -rf "$venv" "$sums" && echo "removed $venv"
  fi
  rmdir "$P" 2>/dev/null || true
  [ -e "$root$conf" ] && echo "kept $root$conf (your configuration; remove it yourself)"
  state=/var/lib/tether
  [ -d "$root$state" ] && echo "kept $root$state (the store: leases and links; remove it yourself to forget them)"
  exit 0
fi

# --- install -------------------------------------------------------------------------
packages="python3 python3-venv python3-iptables iptables nftables conntrack runc"
case "$runtime" in podman|both) packages="$packages podman" ;; esac
missing=""
for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
echo "runtime: $runtime; packages: $packages; missing:${missing:- none}"
if [ "$dry" = 1 ]; then
  echo "would install into $venv; $root$bindir/{${commands// /,}}; $root$conf (if missing); $root$unit; $root$tmpfiles"
  case "$runtime" in podman|both) echo "would write podman's hooks.d files: $hook_files" ;; esac
  exit 0
fi
[ "$(id -u)" = 0 ] || [ -n "$root" ] || die "run as root (it writes /etc and $prefix)"
if [ -n "$missing" ]; then
  if [ "$apt" = 1 ]; then
    echo "apt-get install:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "not installing:$missing (--no-apt); tether needs them"
  fi
fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$python is older than 3.11"
install -d -m 0755 "$P"
# pip builds from a copy: a build in the checkout would leave build/ there
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -r "$src/pyproject.toml" "$src/fused" "$src/hooks" "$stage/"
site() { "$1" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'; }
if [ -n "$deps_from" ]; then
  # no pip of its own (installing pip is the slow part of a venv): the other venv's pip installs
  # tether alone, and a .pth file lets the new venv import that venv's packages
  ver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
  [ -x "$deps_from/bin/python" ] || die "--deps-from $deps_from: no venv there"
  "$python" -m venv --system-site-packages --without-pip "$venv"
  [ "$(ver "$deps_from/bin/python")" = "$(ver "$venv/bin/python")" ] || die "--deps-from $deps_from: another Python version"
  site "$deps_from/bin/python" > "$(site "$venv/bin/python")/tether-deps-from.pth"
  PYTHONWARNINGS=ignore "$deps_from/bin/python" -m pip --python "$venv/bin/python" install -q --disable-pip-version-check \
    --no-deps --no-build-isolation "$stage"
else
  "$python" -m venv --system-site-packages "$venv"
  rm -f "$(site "$venv/bin/python")/tether-deps-from.pth"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$stage"
fi
echo "installed tether $("$venv/bin/tether" --version 2>/dev/null | awk '{print $NF}') into $venv"
# tether-hook runs on every container start: its launcher starts Python with -I -S (hooks/launcher.py)
"$venv/bin/python" -m hooks.launcher "$venv/bin" >/dev/null

install -d -m 0755 "$root/etc/tether"
if [ -e "$root$conf" ]; then
  echo "kept $root$conf"
else
  install -m 0644 "$src/oci-config/tether.toml.example" "$root$conf" && echo "wrote $root$conf"
fi
install -d -m 0755 "$root$bindir"
for c in $commands; do
  l=$root$bindir/$c
  if [ -e "$l" ] && [ ! -L "$l" ]; then
    echo "kept $l: not a symlink (yours?); tether's is $venv/bin/$c"
  else
    ln -sfn "$venv/bin/$c" "$l" && echo "linked $l -> $venv/bin/$c"
  fi
done

# a file that is ours (as shipped, or as we wrote it last time) is replaced;
# one you changed is kept, with ours beside it
new_sums=""
place() {  # place SOURCE PATH (PATH without ROOT)
  local ours=$1 path=$2 f=$root$2
  install -d -m 0755 "$(dirname "$f")"
  if [ ! -e "$f" ]; then
    install -m 0644 "$ours" "$f" && echo "wrote $f"
  elif cmp -s "$ours" "$f"; then
    echo "unchanged $f"
    rm -f "$f.tether-new"
  elif [ "$(sha "$f")" = "$(recorded "$path")" ]; then
    install -m 0644 "$ours" "$f" && echo "updated $f"
    rm -f "$f.tether-new"
  elif [ "$force" = 1 ]; then
    cp -p "$f" "$f.tether-old"
    install -m 0644 "$ours" "$f" && echo "replaced $f (--force); yours is $f.tether-old"
    rm -f "$f.tether-new"
  else
    install -m 0644 "$ours" "$f.tether-new"
    echo "kept $f: you changed it; ours is $f.tether-new (diff the two, then mv it over yours, or install.sh --force)"
    new_sums="$new_sums$(recorded "$path")  $path"$'\n'
    return
  fi
  new_sums="$new_sums$(sha "$f")  $path"$'\n'
}
place "$src/packaging/tether-fused.service" "$unit"
place "$src/packaging/tether.tmpfiles.conf" "$tmpfiles"
printf '%s' "$new_sums" | grep -v '^  ' > "$sums" || true

case "$runtime" in
  podman|both)
    # podman reads hooks.d files from where its containers.conf says (podman
    # 4: /usr/share/containers/oci/hooks.d): `tether oci hooks-dir` finds it;
    # under ROOT, that default, under ROOT
    if [ -z "$root" ]; then
      "$venv/bin/tether" --config "$conf" oci hooks-dir
    else
      "$venv/bin/tether" --config "$root$conf" oci hooks-dir "$root/usr/share/containers/oci/hooks.d"
    fi ;;
  runc)
    echo "runc: add tether's hooks to a bundle with: tether oci patch BUNDLE --name NAME" ;;
esac
if systemd_up; then
  echo "start it: systemctl daemon-reload && systemctl enable --now tether-fused (if it runs already:" \
       "systemctl restart tether-fused takes this version); then: tether doctor"
else
  echo "systemd is not running here: start it with $bindir/tether-fused --config $conf; then: tether doctor"
fi
