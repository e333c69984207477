# A disko disk-config → the install plan the demo installer carries in its image (target device, sfdisk script, one
# line per file system), built at evaluation time as disko builds its own script from the same file.  The pipeline
# plans the same file the same way to check the installed disk (pipeline/diskplan.py, `installer_text`); a test holds
# the two texts equal.  Only what the installer supports is translated: `disk` with a `gpt` table of `filesystem`
# (vfat, ext4) and `swap` partitions; anything else is written as it is and refused by the pipeline before any VM.
{ diskConfig, disk }:
let
  config = if builtins.isFunction diskConfig then diskConfig { } else diskConfig;
  spec = config.disko.devices.disk.${disk};
  parts = spec.content.partitions or { };

  typeGuids = {
    EF00 = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    EF02 = "21686148-6449-6E6F-744E-656564454649";
    "8200" = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";
    "8300" = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
  };

  # disko's order: an explicit priority, else BIOS boot, the ESP, fixed sizes, and "100%" last; ties keep Nix's order.
  priority = name: part:
    if part ? priority then part.priority
    else if (part.type or "") == "EF02" then 100
    else if (part.type or "") == "EF00" then 1000
    else if (part.size or "") == "100%" then 9001
    else 9000;
  names = builtins.attrNames parts;
  indexed = builtins.genList (i: { index = i; name = builtins.elemAt names i; }) (builtins.length names);
  ordered = builtins.sort
    (a: b:
      let pa = priority a.name parts.${a.name}; pb = priority b.name parts.${b.name};
      in pa < pb || (pa == pb && a.index < b.index))
    indexed;

  # "512M" → 512, "16G" → 16384, "100%" → null (MiB, rounded down as the pipeline does).
  mib = size:
    let
      m = builtins.match "([0-9]+(\\.[0-9]+)?) *([KkMmGgTt]?)(i?[Bb])?" (toString size);
      number = builtins.fromJSON (builtins.elemAt m 0);
      unit = builtins.elemAt m 2;
      factor = {
        "" = 1.0 / 1048576; K = 1.0 / 1024; k = 1.0 / 1024; M = 1; m = 1; G = 1024; g = 1024; T = 1048576; t = 1048576;
      }.${unit};
    in
    if size == "100%" || m == null then null else builtins.floor (number * factor);

  formatOf = part: if (part.content.type or "") == "swap" then "swap" else part.content.format or "-";
  typeOf = part:
    let fmt = formatOf part;
    in part.type or (if (part.content.mountpoint or null) == "/boot" && fmt == "vfat" then "EF00"
                     else if fmt == "swap" then "8200" else "8300");
  labelOf = name: part: part.label or "disk-${disk}-${name}";

  numbered = builtins.genList (i: (builtins.elemAt ordered i) // { number = i + 1; }) (builtins.length ordered);
  sfdiskLine = p:
    let part = parts.${p.name}; size = mib (part.size or "100%");
    in "sfdisk " + (if size == null then "" else "size=${toString size}MiB, ")
      + "type=${typeGuids.${typeOf part} or (typeOf part)}, name=\"${labelOf p.name part}\"\n";
  fsLine = p:
    let part = parts.${p.name};
    in "fs ${toString p.number} ${formatOf part} ${part.content.mountpoint or "-"} ${labelOf p.name part}\n";
in
{
  device = spec.device or "";
  text = "# cim install plan for disko disk '${disk}'\n"
    + "target ${spec.device or ""}\n"
    + "sfdisk label: gpt\nsfdisk first-lba: 2048\n"
    + builtins.concatStringsSep "" (map sfdiskLine numbered)
    + builtins.concatStringsSep "" (map fsLine numbered);
}
