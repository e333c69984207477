# The network installer's hardware check (netinstall.nix): a hardware report (nixos-facter's facter.json, read as the
# pipeline's inventory reads it) against the host's declared hardware, before anything is written to a disk.
#
#   jq -r -f hwcheck.jq --argjson declared '{"memory_gib": 64, "cores": 16,
#                                            "disks": [{"name": "main", "device": "/dev/nvme0n1", "size_gib": 512}]}' REPORT
#
# One line per fact: `ok …` when it matches, else `<field>: declared <d>, detected <d> (<kind>)` in the words and the
# order of the pipeline's reconcile. The CPU's cores, memory within 5 % (installed bytes: the SMBIOS memory devices,
# else hwinfo's phys_mem), every declared disk by device name and size within 1 %, and no disk nobody declared.

def gib: . / 1073741824;
def round2: (. * 100 | round) / 100;
def shown: "\(.) GiB";

# A disk's kernel name: its unix_device_name, else the first /dev name that is not a /dev/disk/by-… link, else the
# last part of its sysfs id; without /dev/.
def device_name:
  (.unix_device_name // "") as $name
  | (if $name != "" then $name
     else ([(.unix_device_names // [])[] | select(startswith("/dev/") and (contains("/disk/") | not))] | first)
          // ((.sysfs_id // "") | split("/") | last)
     end)
  | ltrimstr("/dev/");

def disk_bytes:
  first((.resources // [])[] | select(.type == "size" and .unit == "sectors") | .value_1 * (.value_2 // 512)) // 0;

def memory_bytes:
  ([(.smbios.memory_device // [])[] | (.size // 0)] | add // 0) * 1024
  | if . > 0 then .
    else [(.hardware.memory // [])[] | (.resources // [])[] | select(.type == "phys_mem") | .range] | add // 0
    end;

def cores: [(.hardware.cpu // [])[] | (.cores // .siblings // 1)] | add // 0;

. as $report
| [($report.hardware.disk // [])[] | {name: device_name, bytes: disk_bytes, model: (.model // "")}] as $found
| ($declared.memory_gib * 1073741824) as $memory
| ($report | memory_bytes) as $got
| (($report | cores) as $n
   | if $n != $declared.cores then "cpu.cores: declared \($declared.cores), detected \($n) (differs)"
     else "ok cpu cores \($n)" end),
  (if (($got - $memory) | fabs) > 0.05 * $memory
   then "memory_gib: declared \($declared.memory_gib | shown), detected \($got | gib | round2 | shown) (differs)"
   else "ok memory \($got | gib | round2 | shown)"
   end),
  ($declared.disks[] as $disk
   | ($disk.device | ltrimstr("/dev/")) as $name
   | ([$found[] | select(.name == $name)] | first) as $match
   | if $match == null then
       "disks.\($disk.name): declared \($disk.device) \($disk.size_gib | shown), detected (none) (missing)"
     elif (($match.bytes - $disk.size_gib * 1073741824) | fabs) > 0.01 * $disk.size_gib * 1073741824 then
       "disks.\($disk.name).size_gib: declared \($disk.size_gib | shown), detected \($match.bytes | gib | round2 | shown) (differs)"
     else "ok disk \($disk.device) \($match.bytes | gib | round2 | shown)"
     end),
  ([$declared.disks[].device | ltrimstr("/dev/")] as $names
   | $found[] | select(.name as $n | $names | index($n) | not)
   | "disks.\(.name): declared (none), detected /dev/\(.name) \(.bytes | gib | round2 | shown)"
     + (if .model != "" then " \(.model)" else "" end) + " (unexpected)")
