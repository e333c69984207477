# The provisioner guest (domain.json: a guest of kind provisioner on the domain's provisioner host), a NixOS container
# on the host's LAN bridge (./lan.nix) at its LAN address. Everything it says comes from domain.json:
#   - DHCP (dnsmasq) for the declared MACs only: each host's MACs get its declared address and name, anyone else is
#     ignored; no router option (the LAN routes nothing), the guest itself as DNS server.
#   - DNS (dnsmasq) for the domain's names: every host and guest of domain.json; any other name in the domain does
#     not exist, and nothing is forwarded.
#   - Network boot for each netboot host: its image (`self.nixosConfigurations.<host>.config.system.build.netboot`,
#     flake.nix) served under /<host>/ over HTTP (nginx) and TFTP (dnsmasq). An iPXE client (DHCP option 175) is
#     told the URL of its host's netboot.ipxe; a NIC's own PXE firmware is first given iPXE itself over TFTP (EFI or
#     BIOS), which then asks again as an iPXE client. For a netboot host with an `install` section that image is the
#     network installer (./netinstall.nix), its host's own netboot system under /<host>/system/.
#   - A binary cache (nixpkgs' harmonia) on the LAN at http://<this guest>:<cachePort>, from which those installers
#     install their hosts' systems: the guest's system refers to each such host's toplevel (system.extraDependencies),
#     so the provisioner's own system and image carry those closures, and harmonia serves the host's store (the
#     container sees the host's /nix/store and asks the host's nix-daemon). It signs with a key made here, once, at
#     the guest's first boot (cim-cache-key: /var/lib/cim-cache/key.sec, never in the repository); the public half is
#     served at http://<this guest>/cache-key.pub, where the installers fetch it (./netinstall.nix says how to pin it
#     instead).
# Its DHCP, TFTP and HTTP lines go to its journal, which the host mirrors on its consoles (./lan.nix).
{
  domain,
  guest,
  records,
  netbootOf,
  systemOf,
  cachePort,
}:
{ config, lib, pkgs, ... }:
let
  inherit (domain) fqdn;
  inherit (lib.importJSON ./contract.json) ports;
  inherit (guest) address;
  lan = lib.concatStringsSep "." (lib.take 3 (lib.splitString "." address));
  normalMac = mac: lib.toLower (builtins.replaceStrings [ "-" ] [ ":" ] mac);

  netbootHosts = lib.filter (name: lib.elem "netboot" (domain.hosts.${name}.images or [ ])) (
    lib.attrNames domain.hosts
  );
  # The netboot hosts the LAN installs (their netboot image is the network installer): the cache serves their systems.
  installedHosts = lib.filter (name: domain.hosts.${name} ? install) netbootHosts;
  # The cache's signing key pair, made at the first boot; the public half is also served over HTTP.
  keyDir = "/var/lib/cim-cache";
  keyName = "${guest.name}.${domain.provisioner}.${fqdn}-1";
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
      # The binary cache's public key, for the network installers.
      locations."= /cache-key.pub".alias = "${keyDir}/key.pub";
    };
  };

  # The installed systems of the netboot hosts, in this guest's closure (and so in its host's store) for the cache.
  system.extraDependencies = map systemOf installedHosts;

  # The signing key: made once, kept in the guest's state (a live ISO makes a new one at every boot). The secret half
  # is readable by root only (harmonia gets it as a systemd credential), the public half by nginx.
  systemd.services.cim-cache-key = {
    description = "Make the binary cache's signing key ${keyName}, once";
    wantedBy = [ "multi-user.target" ];
    requiredBy = [ "harmonia.service" ];
    before = [
      "harmonia.service"
      "nginx.service"
    ];
    path = [ config.nix.package ];
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
      StateDirectory = "cim-cache";
      UMask = "0077";
    };
    # `nix key` needs no store (the container's store is its host's, read-only).
    script = ''
      nix() { command nix --extra-experimental-features nix-command "$@"; }
      if [ ! -s ${keyDir}/key.sec ]; then
        nix key generate-secret --key-name ${keyName} > ${keyDir}/key.sec.new
        mv ${keyDir}/key.sec.new ${keyDir}/key.sec
      fi
      nix key convert-secret-to-public < ${keyDir}/key.sec > ${keyDir}/key.pub
      chmod 0644 ${keyDir}/key.pub
      echo "binary cache key: $(cat ${keyDir}/key.pub)"
    '';
  };

  services.harmonia = {
    enable = true;
    signKeyPaths = [ "${keyDir}/key.sec" ];
    settings.bind = "[::]:${toString cachePort}";
  };

  networking.firewall.allowedUDPPorts = [
    67 # DHCP
    69 # TFTP
    ports.dns
  ];
  networking.firewall.allowedTCPPorts = [
    80 # HTTP
    cachePort # the binary cache
    ports.dns
  ];
}
