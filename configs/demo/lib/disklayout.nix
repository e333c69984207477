# A disko disk-config → the script the demo installer runs to lay it out (as disko builds its own `_create` and
# `_mount` from the same file, at evaluation time, into the installer's image).  It calls the installer's steps
# (rootfs/sbin/cim-install): `disk`, `gpt`, `table`, `part`, `partdev`, `biosboot`, `mkfs`, `mountfs`, `swapdev`,
# `luks`, `pv`, `vg`, `lv`, `mdmember`, `md`, `subvol`, `swapfile`, `module`; the order is disko's: the disks'
# contents, then the md arrays, then the volume groups, then the file systems without a device (nodev).
# Only what the demo installer makes is translated (gpt and legacy table disks; vfat, ext4, btrfs, xfs, f2fs, swap,
# tmpfs; luks; lvm, its thin pools and RAID volumes; mdadm); the pipeline refuses any other layout before a VM starts
# (pipeline/disklayout.py, `demo_refusal`).
# `firmware`: how the machine boots (domain.json hardware.firmware), which decides its boot loader.
{ diskConfig, firmware ? "uefi" }:
let
  config = if builtins.isFunction diskConfig then diskConfig { lib = { }; } else diskConfig;
  devices = config.disko.devices;
  inherit (builtins) attrNames concatStringsSep concatMap sort genList length elemAt toString map filter;

  q = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";
  words = list: concatStringsSep " " (map q list);

  typeGuids = {
    EF00 = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    EF02 = "21686148-6449-6E6F-744E-656564454649";
    FD00 = "A19D880F-05FC-4D3B-A006-743F0F84911E";
    "8200" = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";
    "8300" = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
    "8E00" = "E6D6D379-F507-44C2-A23C-238F2A3DF928";
  };

  # disko's order: an explicit priority, else BIOS boot, the ESP, fixed sizes, then the partition taking the rest.
  priority = part:
    if part ? priority then part.priority
    else if (part.type or "") == "EF02" then 100
    else if (part.type or "") == "EF00" then 1000
    else if !(part ? size) || part.size == "100%" then 9001
    else 9000;
  ordered = attrs:
    let
      names = attrNames attrs;
      indexed = genList (i: { index = i; name = elemAt names i; }) (length names);
    in
    sort
      (a: b:
        let pa = priority attrs.${a.name}; pb = priority attrs.${b.name};
        in pa < pb || (pa == pb && a.index < b.index))
      indexed;

  # "512M" → 512, "16G" → 16384 (MiB, rounded down); null for "100%" or no size.
  mib = size:
    let
      m = builtins.match "([0-9]+(\\.[0-9]+)?) *([KkMmGgTt]?)(i?[Bb])?" (toString size);
      number = builtins.fromJSON (elemAt m 0);
      factor = {
        "" = 1.0 / 1048576; K = 1.0 / 1024; k = 1.0 / 1024; M = 1; m = 1; G = 1024; g = 1024; T = 1048576; t = 1048576;
      }.${elemAt m 2};
    in
    if m == null then null else builtins.floor (number * factor);

  defaultType = part:
    let c = part.content or { }; in
    if (c.type or "") == "swap" then "8200"
    else if (c.type or "") == "filesystem" && (c.mountpoint or null) == "/boot" && (c.format or "") == "vfat" then "EF00"
    else if (c.type or "") == "mdraid" then "FD00"
    else if (c.type or "") == "lvm_pv" then "8E00"
    else "8300";

  # One gpt table: its sfdisk script (disko's sizes; a `start`/`end` pair as sgdisk takes it), then each partition's
  # content on the partition found by its label.
  gpt = owner: dev: content:
    let
      parts = content.partitions or { };
      # `pos`: where the partition starts when nothing says (the previous one's end, MiB; null after one that takes
      # the rest): an absolute `end` without a `start` (sgdisk's `0:500M`) ends there.
      line = pos: p:
        let
          part = parts.${p.name};
          label = part.label or "${owner}-${p.name}";
          type = part.type or (defaultType part);
          start = if part ? start then mib part.start else null;
          end = if part ? end && builtins.match "-.*" (toString part.end) == null then mib part.end else null;
          from = if start != null then start else pos;
          size = if part ? size && part.size != "100%" then mib part.size
            else if end != null && from != null then end - from else null;
        in
        {
          text = (if start != null || (end != null && !(part ? size)) && from != null then "start=${toString from}MiB, " else "")
            + (if size != null then "size=${toString size}MiB, " else "")
            + "type=${typeGuids.${type} or type}, name=\"${label}\"";
          next = if from != null && size != null then from + size else null;
        };
      order = ordered parts;
      lines = (builtins.foldl' (acc: p: let l = line acc.pos p; in { pos = l.next; out = acc.out ++ [ l.text ]; })
        { pos = 1; out = [ ]; } order).out;
    in
    [ "gpt ${dev} <<'CIM_SFDISK'\nlabel: gpt\nfirst-lba: 2048\n${concatStringsSep "\n" lines}\nCIM_SFDISK" ]
    ++ concatMap
      (p:
        let part = parts.${p.name}; label = part.label or "${owner}-${p.name}";
        in [ "# partition ${label}" ]
          ++ (if (part.type or "") == "EF02" then [ "biosboot ${dev}" ] else [ ])
          ++ contentOf "\"$(part ${q label})\"" "PARTLABEL=${label}" "" p.name (part.content or null))
      order;

  # disko's deviceNumbering: the partition N of a disk as the legacy table type names it.
  partitionDevice = dev: n:
    if builtins.match "/dev/([vs]|(xv)d).+" dev != null then "${dev}${toString n}"
    else if builtins.match "/dev/(disk|zvol)/.+" dev != null then "${dev}-part${toString n}"
    else "${dev}p${toString n}";

  # disko's legacy `table` (parted's mklabel gpt|msdos and mkpart, partitions as a list): the same sfdisk script,
  # partitions in list order from `start` to `end` (taken as MiB, as the gpt type's sizes are; "100%" or a negative
  # end: the rest of the disk), each content on the partition's device as disko numbers it.  msdos: primary
  # partitions, parted's `boot` flag as the MBR's active flag.
  table = dev: ref: c:
    let
      format = c.format or "gpt";
      parts = c.partitions or [ ];
      count = length parts;
      mbrType = part:
        let t = defaultType part; in
        { EF00 = "ef"; "8200" = "82"; FD00 = "fd"; "8E00" = "8e"; }.${t} or "83";
      edge = v: if v == null || builtins.match "(-.*|100%)" (toString v) != null then null else mib v;
      line = i:
        let
          part = elemAt parts i;
          start = edge (part.start or null);
          end = edge (part.end or null);
          size = if start != null && end != null then end - start else null;
        in
        (if start != null then "start=${toString start}MiB, " else "")
        + (if size != null then "size=${toString size}MiB, " else "")
        + (if format == "msdos" then "type=${mbrType part}${if part.bootable or false then ", bootable" else ""}"
           else "type=${typeGuids.${defaultType part}}, name=\"${part.name or "part${toString (i + 1)}"}\"");
      label = if format == "msdos" then "dos" else "gpt";
    in
    [ "table ${dev} ${format} <<'CIM_SFDISK'\nlabel: ${label}\n${concatStringsSep "\n" (genList line count)}\nCIM_SFDISK" ]
    # GRUB embeds itself in the gap after an MBR (a BIOS machine's boot loader; a UEFI one boots from the ESP).
    ++ (if format == "msdos" then [ "biosboot ${dev}" ] else [ ])
    ++ concatMap
      (i:
        let part = elemAt parts i; pdev = partitionDevice ref (i + 1);
        in [ "# partition ${toString (i + 1)}: ${pdev}" "partdev ${q pdev}" ]
          ++ contentOf (q pdev) pdev "" (part.name or "part${toString (i + 1)}") (part.content or null))
      (genList (i: i) count);

  mountOptions = c: concatStringsSep "," (c.mountOptions or [ "defaults" ]);

  btrfs = dev: ref: c:
    let
      subs = c.subvolumes or { };
      subLines = name:
        let s = if subs.${name} == null then { } else subs.${name}; in
        [ "subvol ${dev} ${q name} ${q (s.mountpoint or "-")} ${q (concatStringsSep "," (s.mountOptions or [ "defaults" ]))} ${q ref}" ]
        ++ map (sw: "swapfile ${q (s.mountpoint or "-")} ${q (s.swap.${sw}.path or sw)} ${toString (mib (s.swap.${sw}.size or "0"))}")
          (attrNames (s.swap or { }));
    in
    [ "mkfs btrfs ${dev} ${words (c.extraArgs or [ ])}" ]
    ++ (if c ? mountpoint then [ "mountfs ${dev} ${q c.mountpoint} btrfs ${q (mountOptions c)} ${q ref}" ] else [ ])
    ++ concatMap subLines (attrNames subs)
    ++ map (sw: "swapfile ${q (c.mountpoint or "-")} ${q (c.swap.${sw}.path or sw)} ${toString (mib (c.swap.${sw}.size or "0"))}")
      (attrNames (c.swap or { }));

  # One content node on `dev` (a shell word naming the device at install time; `ref`, how stage 1 finds it at boot).
  contentOf = dev: ref: owner: name: c:
    if c == null then [ "# ${name}: left unformatted" ]
    else if c.type == "gpt" then gpt owner dev c
    else if c.type == "table" then table dev ref c
    else if c.type == "filesystem" then
      [ "mkfs ${q c.format} ${dev} ${words (c.extraArgs or [ ])}" ]
      # (f2fs asks the crypto API for crc32, a module the demo's kernel does not load by itself: no module aliases)
      ++ (if c.format == "f2fs" then [ "module crc32_generic" ] else [ ])
      ++ (if builtins.elem c.format [ "xfs" "f2fs" ] then [ "module ${c.format}" ] else [ ])
      ++ (if c ? mountpoint then [ "mountfs ${dev} ${q c.mountpoint} ${q c.format} ${q (mountOptions c)} ${q ref}" ] else [ ])
    else if c.type == "swap" then [ "swapdev ${dev}" ]
    else if c.type == "luks" then
      let cname = c.name or name; in
      [ "luks ${q cname} ${dev} ${q ref} ${q (c.settings.keyFile or c.passwordFile or c.keyFile or "-")}" ]
      ++ contentOf "/dev/mapper/${cname}" "/dev/mapper/${cname}" "luks-${cname}" cname (c.content or null)
    else if c.type == "lvm_pv" then [ "pv ${q c.vg} ${dev}" ]
    else if c.type == "mdraid" then [ "mdmember ${q c.name} ${dev}" ]
    else if c.type == "btrfs" then btrfs dev ref c
    else [ "unsupported ${q c.type} ${q name}" ];

  disks = devices.disk or { };
  arrays = devices.mdadm or { };
  groups = devices.lvm_vg or { };

  # disko's order of logical volumes: its `priority`, else thin pools (501) before the others (1000), and one taking
  # "100%…" of what is left after those (+251); ties by name.
  lvPriority = lv:
    lv.priority or ((if (lv.lvm_type or null) == "thin-pool" then 501 else 1000)
      + (if builtins.match ".*100%.*" (toString (lv.size or "100%")) != null then 251 else 0));
  lvOrder = lvs: sort (a: b: lvPriority lvs.${a} < lvPriority lvs.${b}) (attrNames lvs);
  # lvcreate's size: a thin volume's virtual size (-V), a share of the free extents (-l), else a size (-L); then its
  # type (disko's lvm_type: thin-pool, thinlv with its pool, mirror, raid0, raid1, …) and the dm target it needs.
  lvSize = lv: let s = toString (lv.size or "100%"); in
    if (lv.lvm_type or null) == "thinlv" then "-V ${toString (mib s)}m"
    else if builtins.match "[0-9]+%.*" s != null then "-l ${builtins.replaceStrings [ "%" ] [ "%FREE" ] (builtins.head (builtins.match "([0-9]+%).*" s))}"
    else "-L ${toString (mib s)}m";
  lvType = lv: let t = lv.lvm_type or null; in
    if t == null then "- -" else if t == "thinlv" then "thinlv ${q lv.pool}" else "${q t} -";
  lvModule = lv: let t = lv.lvm_type or null; in
    if t == null then [ ] else if t == "thin-pool" || t == "thinlv" then [ "module dm_thin_pool" ]
    else if t == "mirror" then [ "module dm_mirror" ] else [ "module dm_raid" ];
  nodevs = devices.nodev or { };
  # The first disk's device (the netboot stage 1 waits for it and checks it is blank before installing).
  target = if disks == { } then "" else (disks.${builtins.head (attrNames disks)}).device or "";
in
{
  inherit target;
  script = concatStringsSep "\n" (
    [ "# cim install layout (lib/disklayout.nix): disko.devices as the demo installer lays them out"
      "target ${target}"
      "firmware ${firmware}" ]
    ++ map (d: "disk ${q d} ${q disks.${d}.device}") (attrNames disks)
    ++ concatMap (d: [ "# disk ${d}" ] ++ contentOf (q disks.${d}.device) disks.${d}.device "disk-${d}" d (disks.${d}.content or null))
      (attrNames disks)
    ++ concatMap
      (a: [ "md ${q a} ${toString (arrays.${a}.level or 1)} ${q (arrays.${a}.metadata or "default")}" ]
        ++ contentOf "/dev/md/${a}" "/dev/md/${a}" "mdadm-${a}" a (arrays.${a}.content or null))
      (attrNames arrays)
    ++ concatMap
      (g: [ "vg ${q g}" ]
        ++ concatMap
          (lv: lvModule groups.${g}.lvs.${lv}
            ++ [ "lv ${q g} ${q lv} ${lvSize groups.${g}.lvs.${lv}} ${lvType groups.${g}.lvs.${lv}}" ]
            ++ contentOf "/dev/${g}/${lv}" "/dev/${g}/${lv}" "lvm_lv-${lv}" lv (groups.${g}.lvs.${lv}.content or null))
          (lvOrder (groups.${g}.lvs or { })))
      (attrNames groups)
    ++ map
      (n: let fs = nodevs.${n}; in
        "mountfs ${q (fs.device or "none")} ${q (fs.mountpoint or n)} ${q fs.fsType} ${q (mountOptions fs)} -")
      (attrNames nodevs)
  ) + "\n";
}
