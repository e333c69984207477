# nixos-facter keeps no MAC address (its hwaddr resources hold a number, not the address). The network installer
# (netinstall.nix) puts each interface's MAC back from /sys/class/net before it publishes the report, so the
# pipeline's inventory and `cim inventory` can name the NICs by MAC:
#
#   jq -f facter-macs.jq --argjson macs '{"eno1": "b0:7b:25:1a:7c:41"}' facter.json
#
# An interface is named as the pipeline names it (its first unix_device_names entry, else the last part of its sysfs
# id); one found in $macs gets a single hwaddr resource carrying that address, its other resources kept as they were.

def interface_name: ((.unix_device_names // [])[0]) // ((.sysfs_id // "") | split("/") | last);

if (.hardware.network_interface | type) == "array" then
  .hardware.network_interface |= map(
    interface_name as $name
    | if $macs[$name] then
        .resources = ([(.resources // [])[] | select(.type != "hwaddr")] + [{type: "hwaddr", address: $macs[$name]}])
      else . end)
else . end
