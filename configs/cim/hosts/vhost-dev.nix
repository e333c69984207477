# vhost-dev: a Dell Precision 7920 Tower that runs nothing but its guests (../guests.nix: dev, dns and nats, each a
# NixOS container on the host's guest bridge at its domain.json address, and pxe, the domain's provisioner, on its
# LAN bridge: ../lan.nix, ../provisioner.nix). The RTX 3080 goes to the guests domain.json passes it through to; the
# host publishes its statistics to its nats guest (configuration.nix, `cim.stats`).
{
  config,
  lib,
  pkgs,
  domain,
  hostName,
  ...
}:
let
  host = domain.hosts.${hostName};

  # Only the installed system runs on the 7920 itself. The ISO (the installer, and what the pipeline boots in QEMU)
  # has no NVIDIA card to load a driver for or hand to a container, nor VT-x for kvm-intel, so it loads neither.
  onHardware = config.cim.image == null;
  passthroughGpus = lib.filter (card: card.passthrough or false) (host.hardware.gpus or [ ]);
  gpuGuests = lib.concatMap (card: card.passthrough_to or [ ]) passthroughGpus;
  nvidia = config.hardware.nvidia.package;
  nvidiaDevices =
    lib.imap0 (index: _: "/dev/nvidia${toString index}") passthroughGpus
    ++ [
      "/dev/nvidiactl"
      "/dev/nvidia-modeset"
      "/dev/nvidia-uvm"
      "/dev/nvidia-uvm-tools"
    ];
  # A container shares the host's kernel, so it uses the host's driver: its device nodes, and its user-space
  # libraries (/run/opengl-driver, which must match the loaded kernel module exactly).
  gpuPassthrough = {
    allowedDevices = map (node: {
      inherit node;
      modifier = "rw";
    }) nvidiaDevices;
    bindMounts =
      lib.genAttrs nvidiaDevices (node: {
        hostPath = node;
        isReadOnly = false;
      })
      // {
        "/run/opengl-driver" = {
          hostPath = "/run/opengl-driver";
          isReadOnly = true;
        };
      };
  };
in
{
  imports = [ ../guests.nix ];

  config = lib.mkMerge [
    {
      # Hardware: the 7920's storage and USB controllers (virtio too, so the installed disk also boots in the
      # pipeline's QEMU) and Intel microcode.
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

      # UEFI with systemd-boot on the ESP that disk-config.nix lays out.
      boot.loader.systemd-boot.enable = true;
      boot.loader.systemd-boot.configurationLimit = 10; # the ESP is 512M
      boot.loader.efi.canTouchEfiVariables = true;

      # The only unfree software on the host is NVIDIA's driver.
      nixpkgs.config.allowUnfreePredicate = pkg: lib.hasPrefix "nvidia-" (lib.getName pkg);
    }

    (lib.mkIf onHardware {
      # VT-x, and headless GPU compute: the driver without X (videoDrivers only selects the driver), the open kernel
      # module (Ampere), kept initialised by nvidia-persistenced; nvidia-uvm is what CUDA needs and a container
      # cannot load itself.
      services.xserver.videoDrivers = [ "nvidia" ];
      hardware.graphics.enable = true;
      hardware.nvidia = {
        open = true;
        package = config.boot.kernelPackages.nvidiaPackages.stable;
        modesetting.enable = true;
        nvidiaPersistenced = true;
        nvidiaSettings = false;
      };
      boot.kernelModules = [
        "kvm-intel"
        "nvidia-uvm"
      ];
      # The GPU's guests get its device nodes and driver libraries, and nvidia-smi from the very driver the host runs.
      containers = lib.genAttrs gpuGuests (_: gpuPassthrough);
      cim.guestConfig = lib.genAttrs gpuGuests (_: {
        environment.systemPackages = [ nvidia.bin ];
      });
      # The device nodes a GPU guest binds appear only once the driver has made them (nvidia-uvm's on first use):
      # nvidia-modprobe makes them, then each must exist before the container starts (a bind of a missing node
      # fails the container).
      systemd.services = {
        cim-nvidia-nodes = {
          description = "Create the NVIDIA device nodes the GPU guests bind";
          after = [ "systemd-modules-load.service" "nvidia-persistenced.service" ];
          wants = [ "nvidia-persistenced.service" ];
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            TimeoutStartSec = "120s";
          };
          script = ''
            ${lib.getExe pkgs.nvidia-modprobe} -c 0 -u -m || true
            for node in ${lib.concatStringsSep " " nvidiaDevices}; do
              for _ in $(seq 1 100); do [ -e "$node" ] && break; sleep 0.5; done
              [ -e "$node" ] || { echo "$node did not appear"; exit 1; }
            done
          '';
        };
      }
      // lib.genAttrs (map (guest: "container@${guest}") gpuGuests) (_: {
        requires = [ "cim-nvidia-nodes.service" ];
        after = [ "cim-nvidia-nodes.service" ];
      });
    })
  ];
}
