# The install disk of vhost-dev and vhost-2 (domain.json's `install.disk_config`), in disko's format: an EFI system
# partition for systemd-boot, swap, and the rest as ext4 root.
# Deliberately plain data, using only `disk`, `gpt`, `filesystem` (vfat/ext4) and `swap`: the pipeline's installer
# reads this file too, and supports exactly those.
{
  disko.devices.disk.main = {
    device = "/dev/nvme0n1";
    type = "disk";
    content = {
      type = "gpt";
      partitions = {
        ESP = {
          size = "512M";
          type = "EF00";
          content = {
            type = "filesystem";
            format = "vfat";
            mountpoint = "/boot";
            mountOptions = [ "umask=0077" ];
          };
        };
        swap = {
          size = "16G";
          content = {
            type = "swap";
          };
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
}
