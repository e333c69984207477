# vhost-pi: a Raspberry Pi 4 Model B at the edge. Its one guest, nats, runs on the host itself as a NATS leaf node of
# the hub (the hypervisor's nats guest): what is published here reaches the domain whenever the link is up, and local
# clients keep working when it is not. The host publishes its statistics to that local server.
{
  config,
  lib,
  domain,
  hostName,
  ...
}:
let
  host = domain.hosts.${hostName};
  hub = lib.findFirst (name: (domain.hosts.${name}.role or "") == "hypervisor") null (
    lib.attrNames domain.hosts
  );
  unitOfKind = {
    nats = "nats.service";
  };
in
{
  # The Pi's firmware starts U-Boot (the SD image puts both on its FIRMWARE partition), which boots
  # /boot/extlinux/extlinux.conf. The mainline kernel drives the Pi 4, and boots in QEMU's `virt` machine as well.
  boot.loader.grub.enable = false;
  boot.loader.generic-extlinux-compatible.enable = true;
  boot.initrd.availableKernelModules = [
    "xhci_pci"
    "usbhid"
    "usb_storage"
  ];
  hardware.enableRedistributableFirmware = true;

  # The SD card is the system disk: the SD image formats and labels it (and defines the same file system itself).
  fileSystems."/" = lib.mkDefault {
    device = "/dev/disk/by-label/NIXOS_SD";
    fsType = "ext4";
  };

  services.nats = {
    enable = true;
    serverName = hostName;
    host = "0.0.0.0"; # devices on the edge LAN publish here
    port = (lib.importJSON ../contract.json).ports.nats; # where the pipeline's NATS probe looks
    settings.leafnodes.remotes = lib.optional (hub != null) {
      url = "nats-leaf://${config.cim.addresses.${hub}}:7422";
    };
  };
  networking.firewall.allowedTCPPorts = [ config.services.nats.port ];

  cim.stats = {
    natsUrl = "nats://127.0.0.1:${toString config.services.nats.port}";
    guests = lib.listToAttrs (
      map (
        guest:
        lib.nameValuePair guest.name (
          unitOfKind.${guest.kind} or (throw "${hostName} runs its guests on the host and knows only nats guests")
        )
      ) host.guests
    );
  };
}
