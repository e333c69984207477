# vhost-2: a Dell OptiPlex 7010 Micro installed from the LAN and running nothing but its guests: nats (../guests.nix, a
# NixOS container on the host's guest bridge), a leaf node of the hub's NATS. The host publishes its statistics to
# that guest (configuration.nix, `cim.stats`) and takes its address by DHCP from the provisioner (../lan.nix says the
# lease on the console).
#
# Its `netboot` image is the network installer (../netinstall.nix, served by vhost-dev's provisioner guest): on a blank
# disk it lays the disk out as ../disk-config.nix declares (flake.nix adds disko for a host with `install`) and
# installs this system from the provisioner's binary cache; on any other machine it boots this system from the LAN,
# run from RAM (flake.nix's netbootModule, which then leaves the disk alone).
{ ... }:
{
  imports = [ ../guests.nix ];

  # The NVMe disk, USB, and virtio too so the installed disk also boots in the pipeline's QEMU; Intel microcode and
  # NIC firmware. Containers need no KVM.
  boot.initrd.availableKernelModules = [
    "nvme"
    "xhci_pci"
    "ahci"
    "usbhid"
    "sd_mod"
    "virtio_pci"
    "virtio_blk"
  ];
  hardware.cpu.intel.updateMicrocode = true;
  hardware.enableRedistributableFirmware = true;

  # UEFI with systemd-boot on the ESP that disk-config.nix lays out. The EFI variables are left alone: the installer
  # may run under BIOS (the pipeline's does), and the firmware finds systemd-boot on the ESP's removable-media path
  # (\EFI\BOOT\BOOTX64.EFI), which bootctl installs too.
  boot.loader.systemd-boot.enable = true;
  boot.loader.systemd-boot.configurationLimit = 10; # the ESP is 512M
}
