# Sourced by every demo builder: a PATH of busybox applets (the derivation's own architecture) and host image tools.
mkdir -p "$TMPDIR/applets"
"$busybox/bin/busybox" --install -s "$TMPDIR/applets"
export PATH="$TMPDIR/applets:$hostTools"
umask 022
