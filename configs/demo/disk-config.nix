# vhost-dev's disk layout in disko's format: the same shape configs/cim/disk-config.nix gives disko on the real
# host (an ESP for systemd-boot, swap, and an ext4 root), sized for the demo's 1 GiB virtual disk.
{
  disko.devices = {
    disk.main = {
      type = "disk";
      device = "/dev/vda";
      content = {
        type = "gpt";
        partitions = {
          ESP = {
            size = "256M"; # room for a few generations' kernels and initrds (NixOS suggests 512M and more)
            type = "EF00";
            content = {
              type = "filesystem";
              format = "vfat";
              mountpoint = "/boot";
              mountOptions = [ "umask=0077" ];
            };
          };
          swap = {
            size = "32M";
            content.type = "swap";
          };
          root = {
            size = "100%";
            content = {
              type = "filesystem";
              format = "ext4";
              mountpoint = "/";
            };
          };
        };
      };
    };
  };
}
