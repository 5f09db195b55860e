#!/usr/bin/env bash
# Installs the Debian package into a throwaway root, runs the README's quick
# start for the package from the installed files, starts the layer from them,
# removes the package (which must take the layer down) and purges it, and
# checks that nothing of it is left: crates/testkit/tests/package.rs runs it
# under `unshare -m` (a mount namespace of its own, gone when it ends).
#
# The throwaway root is an overlay over / (lower: the host's root file
# system, read only; upper: a tmpfs of this namespace), so dpkg sees the
# host's packages and writes only to the tmpfs: the host is never changed.
# /proc, /dev and /sys (without the mounts below it: no bpffs, no cgroups)
# are bound in for dpkg and the compiler.
#
# usage: package_install.sh DEB WORKDIR   (as root, in a new mount namespace)
set -euo pipefail
deb="$1"
work="$2"

mount --make-rprivate /
mount -t tmpfs -o mode=0700 connredir-package-test "$work"
mkdir "$work/upper" "$work/work" "$work/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/upper,workdir=$work/work" "$work/root"
root="$work/root"
mount --bind /proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind /sys "$root/sys"
# Scratch space for the test's own files, outside the overlay's upper dir.
mount -t tmpfs -o mode=1777 scratch "$root/tmp"
cp "$deb" "$root/tmp/connredir.deb"

cat >"$root/tmp/quickstart.c" <<'C'
/* Compiles against the installed headers and links the installed library:
 * a descriptor that is no socket is ENOTSOCK, through the WFP names too. */
#include <connredir.h>
#include <connredir/wfp.h>
#include <errno.h>
#include <stdio.h>

int main(void)
{
    DWORD got = 0;
    int rc = WSAIoctl(0, SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS, NULL, 0, NULL, 0, &got,
                      NULL, NULL);
    if (rc != SOCKET_ERROR || WSAGetLastError() != WSAENOTSOCK) {
        fprintf(stderr, "WSAIoctl on stdin: %d, errno %d\n", rc, errno);
        return 1;
    }
    puts("libconnredir: ok");
    return 0;
}
C

echo "== install"
chroot "$root" /bin/bash -euxo pipefail <<'SH'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
dpkg -i /tmp/connredir.deb
dpkg -s connredir | grep -x 'Status: install ok installed' >/dev/null
SH

echo "== the quick start, from the installed files"
chroot "$root" /bin/bash -euxo pipefail <<'SH'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
connredir --help
connredir-proxy --help
connredir check /etc/connredir/connredir.toml
test -f /usr/share/doc/connredir/README.md
# The unit names the installed command, and is neither enabled nor started.
grep -qx 'ExecStart=/usr/bin/connredir up --config /etc/connredir/connredir.toml' /lib/systemd/system/connredir.service
grep -qx 'ExecStartPre=/usr/bin/connredir check /etc/connredir/connredir.toml' /lib/systemd/system/connredir.service
test ! -e /etc/systemd/system/multi-user.target.wants/connredir.service
# The configuration is a conffile.
dpkg-query -W -f='${Conffiles}\n' connredir | grep '/etc/connredir/connredir.toml' >/dev/null
flags="$(pkg-config --cflags --libs connredir)"
echo "pkg-config: $flags"
case " $flags " in *" -lconnredir "*) ;; *) echo "no -lconnredir" >&2; exit 1 ;; esac
libdir="$(pkg-config --variable=libdir connredir)"
test "$libdir" = "/usr/lib/$(gcc -print-multiarch)"
test -f "$libdir/libconnredir.a"
test "$(readlink "$libdir/libconnredir.so")" = libconnredir.so.0
ldconfig -p | grep 'libconnredir.so.0 ' >/dev/null
cd /tmp
cc -std=c11 -Wall -Wextra -Werror -o quickstart quickstart.c $flags -pthread
./quickstart </dev/null
cc -std=c11 -Wall -Wextra -Werror -o quickstart-static quickstart.c \
  $(pkg-config --cflags connredir) -l:libconnredir.a \
  $(pkg-config --static --libs-only-l connredir | sed 's/-lconnredir//') -pthread
./quickstart-static </dev/null
SH

echo "== a running layer, which the removal must take down"
# A bpffs of this namespace's own (pins of the host's layer stay out of
# reach) and the host's cgroup v2 tree, where the layer's scope is a cgroup
# of this test's own that `up` creates (and `down` removes again).
cg2="$(findmnt -n -t cgroup2 -o TARGET | head -n 1)"
mount -t bpf bpf "$root/sys/fs/bpf"
if [ "$cg2" != /sys/fs/cgroup ]; then
  mount -t tmpfs -o mode=0755 cgroups "$root/sys/fs/cgroup"
  mkdir -p "$root$cg2"
fi
mount --bind "$cg2" "$root$cg2"
# /run of its own, so that only this test's `up` is found there.
mount -t tmpfs -o mode=0755 run "$root/run"
scope="$cg2/connredir-test-package-$$"
up_pid=""
cleanup() {
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    kill "$up_pid"
    wait "$up_pid" || true
  fi
  rmdir "$scope" 2>/dev/null || true
}
trap cleanup EXIT
cat >"$root/tmp/layer.toml" <<TOML
[scope]
cgroups = ["$scope"]

[[service]]
name = "scanner"
listen = ["127.0.0.1:1"]
identity = { uids = [65534] }
TOML
chroot "$root" /usr/bin/connredir up --config /tmp/layer.toml >"$root/tmp/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 100); do
  if chroot "$root" /usr/bin/connredir status >/dev/null 2>&1; then
    break
  fi
  sleep 0.1
done
chroot "$root" /usr/bin/connredir status || { cat "$root/tmp/up.log"; exit 1; }
test -d "$scope"
test -d "$root/sys/fs/bpf/connredir"

echo "== an upgrade (the same version again) leaves the layer running"
chroot "$root" /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg -i /tmp/connredir.deb
kill -0 "$up_pid"
chroot "$root" /usr/bin/connredir status >/dev/null
test -d "$root/sys/fs/bpf/connredir"

echo "== remove, then purge"
chroot "$root" /bin/bash -euxo pipefail <<'SH'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
dpkg -r connredir
# prerm took the layer down: `up` stopped, its pins and its scope cgroup
# removed.
test ! -e /sys/fs/bpf/connredir
test ! -e /run/connredir
test ! -e /usr/bin/connredir
test ! -e /usr/include/connredir.h
# dpkg keeps a removed package's conffiles until it is purged.
test -f /etc/connredir/connredir.toml
dpkg -P connredir
test ! -e /etc/connredir
if dpkg-query -W connredir 2>/dev/null; then exit 1; fi
if ldconfig -p | grep libconnredir; then exit 1; fi
if grep '^Package: connredir$' /var/lib/dpkg/status; then exit 1; fi
SH

if kill -0 "$up_pid" 2>/dev/null; then
  echo "connredir up still runs after dpkg -r"
  exit 1
fi
wait "$up_pid" || true
up_pid=""
if [ -e "$scope" ]; then
  echo "the scope cgroup $scope that up created is still there after dpkg -r"
  exit 1
fi

echo "== what is left in the overlay's upper dir"
# Only dpkg's own bookkeeping (its database, its log) and the dynamic
# linker's cache may have changed; every other entry must be a directory the
# host has too (the overlay copies a changed file's directories up).
left=0
while IFS= read -r -d '' entry; do
  path="${entry#"$work/upper"}"
  case "$path" in
    /var/lib/dpkg/*|/var/log/dpkg.log|/etc/ld.so.cache|/var/cache/ldconfig/*) continue ;;
  esac
  if [ -d "$entry" ] && [ ! -L "$entry" ] && [ -d "$path" ] && [ ! -L "$path" ]; then
    continue
  fi
  echo "left behind: $path ($(stat -c %F "$entry"))"
  left=1
done < <(find "$work/upper" -mindepth 1 -print0)
# dpkg's log and the backup of its database from before the purge may name
# the package; nothing else may.
named="$(grep -rl connredir "$work/upper" | grep -v -e "^$work/upper/var/log/dpkg.log\$" \
  -e "^$work/upper/var/lib/dpkg/status-old\$" || true)"
if [ -n "$named" ]; then
  echo "left behind, naming connredir:"
  echo "$named"
  left=1
fi
if [ "$left" -ne 0 ]; then
  exit 1
fi
echo "nothing of the package is left"
