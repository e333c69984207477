# The network installer of a netboot host with an `install` section (flake.nix builds it into the host's
# `system.build.netboot` on top of nixpkgs' netboot-minimal.nix): a small NixOS that the provisioner's iPXE boots and
# that holds neither the host's system nor its store. Its one service, cim-netinstall (./netinstall.sh), finds the
# install disk that the host's disk-config.nix names and
#   - when it is blank: says the contract's started line, reports the hardware (nixos-facter, each NIC's MAC put back
#     by ./facter-macs.jq) on NATS subject cim.<host>.inventory to the provisioner's host's nats guest (through the
#     port forward that host keeps on its LAN address, ./guests.nix), checks it against domain.json (./hwcheck.jq:
#     memory within 5 %, CPU cores, disks by device and size within 1 %, no undeclared disk) and under the domain's
#     `"inventory": "enforce"` stops there with the failed line naming each difference, the disk untouched; else lays
#     out the disk with disko (the format-mount script disko builds from disk-config.nix) and runs
#     `nixos-install --system <the host's toplevel>` with the provisioner's binary cache as its one remote substituter
#     (nixos-install adds the installer's own store), says the done line (or the failed line with the reason) and
#     powers off;
#   - when it is absent or not blank: writes nothing and boots the host's own system from the LAN (the provisioner
#     serves it beside the installer, under <host>/system/; kexec), as the host's netboot image did before it had an
#     install section. A re-install is deliberate: wipe the disk, then netboot.
# The host's system is named by its store path only (its string context dropped): it comes over the LAN from the
# provisioner's cache (./provisioner.nix), whose system carries it, not inside this initrd.
#
# The cache's signing key is created on the provisioner at its first boot; its public half is served next to the
# netboot images (http://<pxe>/cache-key.pub). The installer fetches it there at install time and trusts it: the same
# trust the LAN already has, as the installer's kernel and initrd came over it unsigned. To pin it instead, put the
# public key (one line, `<name>:<base64>`, as `curl http://<pxe>/cache-key.pub` prints it) in cache-key.pub beside
# this file; the installer then trusts that key only. (The pipeline's provisioner is a live ISO that makes a new key
# at every boot: a pinned key makes its network install fail at the first signature.)
{
  config,
  lib,
  pkgs,
  domain,
  hostName,
  installed,
  cachePort,
  ...
}:
let
  contract = lib.importJSON ./contract.json;
  forHost = builtins.replaceStrings [ "{host}" ] [ hostName ];
  host = domain.hosts.${hostName};
  normalMac = mac: lib.toLower (builtins.replaceStrings [ "-" ] [ ":" ] mac);

  # Where the provisioner is: its host, that host's provisioner guest (the LAN's pxe) and nats guest.
  provisionerHost = domain.hosts.${domain.provisioner};
  guestOfKind =
    kind: lib.findFirst (guest: guest.kind == kind) null (provisionerHost.guests or [ ]);
  pxe = (guestOfKind "provisioner").address;
  nats = guestOfKind "nats";

  disk = installed.disko.devices.disk.${host.install.disk or "main"}.device;
  pinnedKey =
    if builtins.pathExists ./cache-key.pub then
      lib.removeSuffix "\n" (builtins.readFile ./cache-key.pub)
    else
      "";
  # What the check compares, from domain.json.
  declared = {
    inherit (host.hardware) memory_gib;
    inherit (host.hardware.cpu) cores;
    disks = map (d: { inherit (d) name device size_gib; }) (host.hardware.disks or [ ]);
  };
in
{
  networking.hostName = hostName;
  # It installs from the cache and builds nothing: no copy of nixpkgs in the image.
  system.installer.channel.enable = false;
  # The PC UART last, so it is /dev/console, where the service's lines go (the pipeline reads the serial console).
  boot.kernelParams = [
    "console=tty0"
    "console=ttyS0,115200n8"
  ];

  systemd.services.cim-netinstall = {
    description = "Install ${hostName} from the LAN onto a blank ${disk}, or boot its system";
    wantedBy = [ "multi-user.target" ];
    wants = [ "network-online.target" ];
    after = [ "network-online.target" ];
    path = [
      config.system.build.nixos-install
      config.nix.package
      pkgs.nixos-enter
      pkgs.nixos-facter
      pkgs.natscli
      pkgs.jq
      pkgs.curl
      pkgs.kexec-tools
      pkgs.util-linux
      pkgs.coreutils
      pkgs.diffutils
      pkgs.gawk
      pkgs.gnugrep
      pkgs.gnused
      pkgs.systemd
    ];
    environment = {
      HOME = "/run/cim-netinstall"; # natscli keeps its contexts under $HOME
      CIM_HOST = hostName;
      CIM_MAC = normalMac (lib.head host.hardware.nics).mac;
      CIM_DISK = disk;
      CIM_DISKO = "${installed.system.build.formatMount}/bin/disko-format-mount";
      CIM_SYSTEM = builtins.unsafeDiscardStringContext "${installed.system.build.toplevel}";
      CIM_CACHE = "http://${pxe}:${toString cachePort}";
      CIM_CACHE_KEY = pinnedKey;
      CIM_CACHE_KEY_URL = "http://${pxe}/cache-key.pub";
      CIM_SYSTEM_URL = "http://${pxe}/${hostName}/system";
      CIM_KERNEL = config.system.boot.loader.kernelFile;
      CIM_NATS =
        if nats == null then
          ""
        else
          "nats://${provisionerHost.address}:${toString contract.ports.nats}";
      CIM_SUBJECT = forHost contract.subjects.inventory;
      CIM_DECLARED = builtins.toJSON declared;
      CIM_POLICY = domain.inventory or "record";
      CIM_HWCHECK = "${./hwcheck.jq}";
      CIM_FACTER_MACS = "${./facter-macs.jq}";
      CIM_STARTED = forHost contract.install.started;
      CIM_DONE = forHost contract.install.done;
      CIM_FAILED = forHost contract.install.failed;
    };
    serviceConfig = {
      Type = "oneshot";
      TimeoutStartSec = "infinity"; # an install takes as long as the LAN needs
      RuntimeDirectory = "cim-netinstall";
      ExecStart = "${pkgs.bash}/bin/bash ${./netinstall.sh}";
      StandardOutput = "journal+console";
      StandardError = "journal+console";
    };
  };
}
