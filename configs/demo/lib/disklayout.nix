# A disko disk-config → the script the demo installer runs to lay it out (as disko builds its own `_create` and
# `_mount` from the same file, at evaluation time, into the installer's image).  It calls the installer's steps
# (rootfs/sbin/cim-install): `disk`, `gpt`, `part`, `biosboot`, `mkfs`, `mountfs`, `swapdev`, `luks`, `pv`, `vg`, `lv`, `mdmember`,
# `md`, `subvol`, `swapfile`; the order is disko's: the disks' contents, then the md arrays, then the volume groups.
# Only what the demo installer makes is translated (gpt disks; vfat, ext4, btrfs, swap; luks; lvm; mdadm); the
# pipeline refuses any other layout before a VM starts (pipeline/disklayout.py, `demo_refusal`).
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
      line = p:
        let
          part = parts.${p.name};
          label = part.label or "${owner}-${p.name}";
          type = part.type or (defaultType part);
          start = if part ? start then mib part.start else null;
          end = if part ? end && builtins.match "-.*" (toString part.end) == null then mib part.end else null;
          size = if part ? size then mib part.size else if start != null && end != null then end - start else null;
        in
        (if start != null then "start=${toString start}MiB, " else "")
        + (if size != null then "size=${toString size}MiB, " else "")
        + "type=${typeGuids.${type} or type}, name=\"${label}\"";
      order = ordered parts;
    in
    [ "gpt ${dev} <<'CIM_SFDISK'\nlabel: gpt\nfirst-lba: 2048\n${concatStringsSep "\n" (map line order)}\nCIM_SFDISK" ]
    ++ concatMap
      (p:
        let part = parts.${p.name}; label = part.label or "${owner}-${p.name}";
        in [ "# partition ${label}" ]
          ++ (if (part.type or "") == "EF02" then [ "biosboot ${dev}" ] else [ ])
          ++ contentOf "\"$(part ${q label})\"" "PARTLABEL=${label}" "" p.name (part.content or null))
      order;

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
    else if c.type == "filesystem" then
      [ "mkfs ${q c.format} ${dev} ${words (c.extraArgs or [ ])}" ]
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

  # disko creates the logical volumes with a fixed size first, "100%…" last.
  lvOrder = lvs: sort (a: b: (builtins.match ".*%.*" (toString (lvs.${a}.size or "100%")) == null)
    && (builtins.match ".*%.*" (toString (lvs.${b}.size or "100%")) != null) || false) (attrNames lvs);
  lvSize = size: let s = toString size; in
    if builtins.match "[0-9]+%.*" s != null then "-l ${builtins.replaceStrings [ "%" ] [ "%FREE" ] (builtins.head (builtins.match "([0-9]+%).*" s))}"
    else "-L ${toString (mib s)}m";
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
          (lv: [ "lv ${q g} ${q lv} ${lvSize (groups.${g}.lvs.${lv}.size or "100%")}" ]
            ++ contentOf "/dev/${g}/${lv}" "/dev/${g}/${lv}" "lvm_lv-${lv}" lv (groups.${g}.lvs.${lv}.content or null))
          (lvOrder (groups.${g}.lvs or { })))
      (attrNames groups)
  ) + "\n";
}
