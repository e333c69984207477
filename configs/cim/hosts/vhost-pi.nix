# vhost-pi: a Raspberry Pi 4 Model B at the edge. Its one guest, nats (../guests.nix: a NixOS container on the Pi's
# guest bridge), is a NATS leaf node of the hub (../guests.nix: the provisioner's nats guest): what is published here
# reaches the domain whenever the link is up, and local clients keep working when it is not. The host publishes its
# statistics to that guest.
{ lib, ... }:
{
  imports = [ ../guests.nix ];

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
}
