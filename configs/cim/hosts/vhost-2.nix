# vhost-2: a diskless Dell OptiPlex 7010 Micro that boots from the LAN (its `netboot` image, flake.nix, served by
# vhost-dev's provisioner guest) and runs nothing but its guests: nats (../guests.nix, a NixOS container on the host's
# guest bridge), a leaf node of the hub's NATS. The host publishes its statistics to that guest (configuration.nix,
# `cim.stats`) and takes its address by DHCP from the provisioner (../lan.nix says the lease on the console).
{ lib, ... }:
{
  imports = [ ../guests.nix ];

  # Intel microcode and NIC firmware; netboot needs no storage driver in the initrd (the store rides in it), and
  # containers need no KVM.
  hardware.cpu.intel.updateMicrocode = true;
  hardware.enableRedistributableFirmware = true;

  # Nothing to install a boot loader onto: the machine's firmware fetches iPXE, the kernel and the initrd over the
  # LAN. The system runs from RAM (the netboot image mounts the same tmpfs root itself).
  boot.loader.grub.enable = false;
  fileSystems."/" = lib.mkDefault {
    device = "none";
    fsType = "tmpfs";
    options = [ "mode=0755" ];
  };
}
