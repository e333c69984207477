# The provisioner guest (domain.json: a guest of kind provisioner on the domain's provisioner host), a NixOS container
# on the host's LAN bridge (./lan.nix) at its LAN address. Everything it says comes from domain.json:
#   - DHCP (dnsmasq) for the declared MACs only: each host's MACs get its declared address and name, anyone else is
#     ignored; no router option (the LAN routes nothing), the guest itself as DNS server.
#   - DNS (dnsmasq) for the domain's names: every host and guest of domain.json; any other name in the domain does
#     not exist, and nothing is forwarded.
#   - Network boot for each netboot host: its image (`self.nixosConfigurations.<host>.config.system.build.netboot`,
#     flake.nix) served under /<host>/ over HTTP (nginx) and TFTP (dnsmasq). An iPXE client (DHCP option 175) is
#     told the URL of its host's netboot.ipxe; a NIC's own PXE firmware is first given iPXE itself over TFTP (EFI or
#     BIOS), which then asks again as an iPXE client.
# Its DHCP, TFTP and HTTP lines go to its journal, which the host mirrors on its consoles (./lan.nix).
{
  domain,
  guest,
  records,
  netbootOf,
}:
{ lib, pkgs, ... }:
let
  inherit (domain) fqdn;
  inherit (lib.importJSON ./contract.json) ports;
  inherit (guest) address;
  lan = lib.concatStringsSep "." (lib.take 3 (lib.splitString "." address));
  normalMac = mac: lib.toLower (builtins.replaceStrings [ "-" ] [ ":" ] mac);

  netbootHosts = lib.filter (name: lib.elem "netboot" (domain.hosts.${name}.images or [ ])) (
    lib.attrNames domain.hosts
  );
  # Where the netboot images are served: /srv/netboot/<host>/{bzImage,initrd,netboot.ipxe} (the whole image, as
  # the Hydra job lays it out), beside iPXE for the NICs that do not run it yet.
  root = "/srv/netboot";
  tree = pkgs.linkFarm "cim-netboot" (
    map (name: {
      inherit name;
      path = netbootOf name;
    }) netbootHosts
    ++ [
      {
        name = "ipxe.efi";
        path = "${pkgs.ipxe}/ipxe.efi";
      }
      {
        name = "undionly.kpxe";
        path = "${pkgs.ipxe}/undionly.kpxe";
      }
    ]
  );
  script = name: "http://${address}/${name}/netboot.ipxe";
in
{
  systemd.tmpfiles.rules = [ "L+ ${root} - - - - ${tree}" ];

  services.dnsmasq = {
    enable = true;
    # The guest resolves nothing itself; dnsmasq answers the LAN only.
    resolveLocalQueries = false;
    settings = {
      interface = "eth0";
      bind-interfaces = true;

      # DNS: the domain's names, nothing else, nothing forwarded.
      no-resolv = true;
      no-hosts = true;
      domain = fqdn;
      local = "/${fqdn}/";
      host-record = lib.mapAttrsToList (name: ip: "${name},${ip}") records;

      # DHCP: a static range (only dhcp-host addresses are given), one dhcp-host per declared host with all its
      # MACs, tagged with its name; no lease for any other MAC.
      dhcp-range = "${lan}.0,static,255.255.255.0,1h";
      dhcp-host = lib.mapAttrsToList (
        name: other:
        lib.concatStringsSep "," (
          map (nic: normalMac nic.mac) other.hardware.nics
          ++ [
            "set:${name}"
            other.address
            name
          ]
        )
      ) (lib.filterAttrs (_: other: (other.hardware.nics or [ ]) != [ ]) domain.hosts);
      dhcp-ignore = "tag:!known";
      dhcp-option = [
        "option:router" # none: no default route on the LAN
        "option:dns-server,${address}"
        "option:domain-name,${fqdn}"
      ];
      log-dhcp = true;

      # Network boot: iPXE asks with option 175; PXE firmware names its architecture (7 and 9: x86-64 EFI).
      dhcp-match = [
        "set:ipxe,175"
        "set:efi64,option:client-arch,7"
        "set:efi64,option:client-arch,9"
      ];
      dhcp-boot = lib.concatMap (name: [
        "tag:${name},tag:ipxe,${script name}"
        "tag:${name},tag:!ipxe,tag:efi64,ipxe.efi"
        "tag:${name},tag:!ipxe,tag:!efi64,undionly.kpxe"
      ]) netbootHosts;
      enable-tftp = true;
      tftp-root = root;
    };
  };

  services.nginx = {
    enable = true;
    # One line per request in the journal, with the URL (`url:`), for the host's consoles.
    commonHttpConfig = ''
      log_format cim_lan '$remote_addr url:$request_uri $status $body_bytes_sent';
    '';
    virtualHosts.netboot = {
      default = true;
      inherit root;
      extraConfig = ''
        access_log syslog:server=unix:/dev/log,tag=nginx,nohostname cim_lan;
      '';
    };
  };

  networking.firewall.allowedUDPPorts = [
    67 # DHCP
    69 # TFTP
    ports.dns
  ];
  networking.firewall.allowedTCPPorts = [
    80 # HTTP
    ports.dns
  ];
}
