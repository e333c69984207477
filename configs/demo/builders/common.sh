# Sourced by every demo builder.  Every tool comes from the Nix store: busybox applets (the derivation's own
# architecture) and, for the image builders, Debian's image tools ($imageTools), which are dynamically linked and so
# run through the input's own ld.so (the sandbox has no /lib64 interpreter).  Nothing is taken from /usr or /bin.
mkdir -p "$TMPDIR/applets" "$TMPDIR/tools"
"$busybox/bin/busybox" --install -s "$TMPDIR/applets"
if [ -n "${imageTools:-}" ]; then
    export GCONV_PATH="$imageTools/lib/gconv" # mtools' code page 850
    for libdir in "$imageTools"/lib/*-linux-gnu; do :; done
    for loader in "$libdir"/ld-linux-*; do :; done
    for tool in "$imageTools"/bin/*; do
        name=${tool##*/}
        printf '#!%s sh\nexec %s --library-path %s --argv0 %s %s "$@"\n' \
            "$busybox/bin/busybox" "$loader" "$libdir" "$name" "$tool" > "$TMPDIR/tools/$name"
        chmod +x "$TMPDIR/tools/$name"
    done
fi
export PATH="$TMPDIR/tools:$TMPDIR/applets"
umask 022

# Timestamps come from SOURCE_DATE_EPOCH (a constant of the flake) and never from the clock.
: "${SOURCE_DATE_EPOCH:?SOURCE_DATE_EPOCH is not set: the demo flake passes it to every builder}"
export SOURCE_DATE_EPOCH

# Give every file under DIR the mtime SOURCE_DATE_EPOCH.
fix_mtimes() {
    find "$1" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}

# A newc archive of DIR on stdout: sorted members, fixed mtimes, owner root, inode numbers from 1, no device numbers.
cpio_of() {
    fix_mtimes "$1"
    (cd "$1" && find . | sort | cpio -o -H newc -R 0:0 --renumber-inodes --ignore-devno 2>/dev/null)
}

# Copy the tree DIR into the FAT image IMG: directories, then files, each in sorted order and with their mtimes
# (`mcopy -s` would follow readdir order, which differs between file systems, e.g. ext4 and tmpfs).
fat_copy() {
    (cd "$2" && find . -mindepth 1 -type d | sort) | while read -r dir; do mmd -i "$1" "::/${dir#./}"; done
    (cd "$2" && find . -type f | sort) | while read -r file; do mcopy -m -i "$1" "$2/${file#./}" "::/${file#./}"; done
}

# The KiB the files under DIR take, from their sizes alone (du depends on the build machine's file system).
size_kib() {
    files=$(find "$1" -type f -exec stat -c %s {} + | awk '{ kib += int(($1 + 4095) / 4096) * 4 } END { print kib + 0 }')
    echo $((files + $(find "$1" ! -type f | wc -l) * 4))
}
