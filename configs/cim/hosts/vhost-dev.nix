# vhost-dev: a Dell Precision 7920 Tower that runs nothing but its guests. Each guest of domain.json is a NixOS
# container on a bridge only the host and its guests share; the RTX 3080 goes to the guests domain.json passes it
# through to; the host publishes its statistics to the nats guest (configuration.nix, `cim.stats`).
{
  config,
  lib,
  domain,
  hostName,
  ...
}:
let
  host = domain.hosts.${hostName};
  # The ports the pipeline's probes use (the image contract, ../contract.json): NATS clients and DNS.
  inherit (lib.importJSON ../contract.json) ports;
  inherit (domain) fqdn;

  # The guest network. The host routes and NATs it to the LAN, and forwards the services the LAN uses (DNS, NATS and
  # its leaf-node port) from its own address to the guest that serves them.
  bridge = "br-guests";
  gateway = "10.23.0.1";
  guestAddresses = lib.listToAttrs (
    lib.imap0 (index: guest: lib.nameValuePair guest.name "10.23.0.${toString (10 + index)}") host.guests
  );
  addressOfKind =
    kind:
    let
      guests = lib.filter (guest: guest.kind == kind) host.guests;
    in
    if guests == [ ] then
      throw "${hostName} has no ${kind} guest in domain.json"
    else
      guestAddresses.${(lib.head guests).name};

  forwards = [
    {
      proto = "tcp";
      port = ports.nats; # NATS clients
      kind = "nats";
    }
    {
      proto = "tcp";
      port = 7422; # NATS leaf nodes (the edge hosts)
      kind = "nats";
    }
    {
      proto = "udp";
      port = ports.dns;
      kind = "dns";
    }
    {
      proto = "tcp";
      port = ports.dns;
      kind = "dns";
    }
  ];

  # The names the dns guest answers, relative to the domain: every host at its LAN address; this host's guests at
  # their bridge address, both bare (`nats`) and under the host (`nats.vhost-dev`); other hosts' guests, which run on
  # the host itself, at their host's address (`nats.vhost-pi`).
  records =
    config.cim.addresses
    // lib.concatMapAttrs (
      name: other:
      lib.optionalAttrs (name != hostName) (
        lib.listToAttrs (
          map (guest: lib.nameValuePair "${guest.name}.${name}" config.cim.addresses.${name}) (other.guests or [ ])
        )
      )
    ) domain.hosts
    // lib.mapAttrs' (name: address: lib.nameValuePair "${name}.${hostName}" address) guestAddresses
    // guestAddresses;

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

  # What every guest shares: its place on the guest network, and the dns guest as its resolver.
  guestBase = guest: {
    networking.domain = fqdn;
    networking.useDHCP = false;
    networking.defaultGateway = {
      address = gateway;
      interface = "eth0";
    };
    networking.useHostResolvConf = false;
    networking.nameservers = [ (addressOfKind "dns") ];
    time.timeZone = "UTC";
    system.stateVersion = config.system.stateVersion;
  };

  # What each kind of guest runs.
  kinds = {
    nats = guest: {
      services.nats = {
        enable = true;
        serverName = "${hostName}-${guest.name}";
        host = "0.0.0.0";
        port = ports.nats;
        jetstream = true;
        settings.leafnodes.port = 7422;
      };
      networking.firewall.allowedTCPPorts = [
        ports.nats
        7422
      ];
    };

    dns = guest: {
      services.unbound = {
        enable = true;
        settings.server = {
          interface = [
            "127.0.0.1"
            "::1"
            guestAddresses.${guest.name}
          ];
          # The guests, and the LAN through the host's port forward (which keeps the client's address).
          access-control = [
            "127.0.0.0/8 allow"
            "::1/128 allow"
            "10.0.0.0/8 allow"
            "172.16.0.0/12 allow"
            "192.168.0.0/16 allow"
          ];
          # unbound writes these values verbatim, so they carry their own quotes.
          local-zone = [ ''"${fqdn}." static'' ];
          local-data = lib.mapAttrsToList (name: address: ''"${name}.${fqdn}. IN A ${address}"'') records;
        };
      };
      networking.firewall.allowedTCPPorts = [ ports.dns ];
      networking.firewall.allowedUDPPorts = [ ports.dns ];
    };

    dev =
      guest:
      { pkgs, ... }:
      {
        imports = [ config.cim.loginModule ];
        nix.settings.experimental-features = [
          "nix-command"
          "flakes"
        ];
        # nvidia-smi from the very driver the host runs.
        environment.systemPackages = [ pkgs.git ] ++ lib.optional (onHardware && lib.elem guest.name gpuGuests) nvidia.bin;
      };
  };

  container =
    guest:
    {
      autoStart = true;
      privateNetwork = true;
      hostBridge = bridge;
      localAddress = "${guestAddresses.${guest.name}}/24";
      config = {
        imports = [
          (guestBase guest)
          (kinds.${guest.kind} guest)
        ];
      };
    }
    // lib.optionalAttrs (onHardware && lib.elem guest.name gpuGuests) gpuPassthrough;
in
{
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

      networking.bridges.${bridge}.interfaces = [ ];
      networking.interfaces.${bridge}.ipv4.addresses = [
        {
          address = gateway;
          prefixLength = 24;
        }
      ];
      networking.hosts = lib.mapAttrs' (
        name: address:
        lib.nameValuePair address [
          "${name}.${fqdn}"
          name
        ]
      ) guestAddresses;
      # The forwards below are iptables rules (networking.nat.extraCommands), so keep the iptables firewall.
      networking.nftables.enable = false;
      networking.nat = {
        enable = true;
        internalInterfaces = [ bridge ];
        # nat.forwardPorts needs the external interface's name, which a DHCP host that also boots in QEMU does not
        # have; match "addressed to this host, not coming from a guest" instead.
        extraCommands = lib.concatMapStrings (forward: ''
          iptables -w -t nat -A nixos-nat-pre ! -i ${bridge} -m addrtype --dst-type LOCAL \
            -p ${forward.proto} --dport ${toString forward.port} \
            -j DNAT --to-destination ${addressOfKind forward.kind}:${toString forward.port}
        '') forwards;
      };

      containers = lib.listToAttrs (map (guest: lib.nameValuePair guest.name (container guest)) host.guests);

      # Each container gets the memory and CPUs domain.json gives its guest.
      systemd.services = lib.listToAttrs (
        map (
          guest:
          lib.nameValuePair "container@${guest.name}" {
            serviceConfig =
              lib.optionalAttrs (guest ? memory_mib) { MemoryMax = "${toString guest.memory_mib}M"; }
              // lib.optionalAttrs (guest ? vcpus) { CPUQuota = "${toString (guest.vcpus * 100)}%"; };
          }
        ) host.guests
      );

      cim.stats = {
        natsUrl = "nats://${addressOfKind "nats"}:${toString ports.nats}";
        guests = lib.listToAttrs (
          map (guest: lib.nameValuePair guest.name "container@${guest.name}.service") host.guests
        );
      };
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
    })
  ];
}
