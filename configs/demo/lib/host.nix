# One host of the domain: its system closure (toplevel) and the images domain.json asks for.
{ contract, domain, hostName, host, inputs, sourceDateEpoch, netbootOf, modules ? [ ] }:
let
  system = host.system;

  # The NixOS options the demo's modules may set (extendModules): files under /etc and systemd-boot's boot counting.
  # Anything else is refused here rather than ignored.
  known = [ "environment" "boot" ];
  checked = map (m:
    let unknown = builtins.filter (k: !(builtins.elem k known)) (builtins.attrNames m);
    in if builtins.isAttrs m && unknown == [ ] then m
    else throw "the demo's modules set environment.etc.<name>.text and boot.loader.systemd-boot.bootCounting.tries only; got ${builtins.toJSON (if builtins.isAttrs m then unknown else m)}")
    modules;
  etc = builtins.foldl' (acc: m: acc // (m.environment.etc or { })) { } checked;
  etcNames = builtins.attrNames etc;
  # systemd-boot's boot counting (nixpkgs: boot.loader.systemd-boot.bootCounting): a new generation's entry is
  # tried this many times before the boot loader falls back to the last good one.
  bootTries = builtins.foldl' (acc: m: m.boot.loader.systemd-boot.bootCounting.tries or acc) 3 checked;
  # A host that installs onto a disk takes its next generations over SSH: it runs an SSH server of its own (on the
  # management interface), for the domain's accounts.
  hostSsh = host ? install && system == "x86_64-linux";

  # The contract's names for this host, as shell assignments the init scripts and the installer source.
  forHost = builtins.replaceStrings [ "{host}" ] [ hostName ];
  contractEnv = ''
    CIM_BOOT_COMPLETE='${forHost contract.boot_complete}'
    CIM_INSTALL_CREDENTIAL='${contract.install.credential}'
    CIM_INSTALL_STARTED='${forHost contract.install.started}'
    CIM_INSTALL_DONE='${forHost contract.install.done}'
    CIM_INSTALL_FAILED='${forHost contract.install.failed}'
    CIM_REPORT_FS='${contract.report.fs}'
    CIM_REPORT_PART='${contract.report.part}'
    CIM_REPORT_SWAP='${contract.report.swap}'
    CIM_REPORT_LAYER='${contract.report.layer}'
    CIM_STATS_SUBJECT='${forHost contract.subjects.stats}'
    CIM_INVENTORY_SUBJECT='${forHost contract.subjects.inventory}'
    CIM_NATS_PORT=${toString contract.ports.nats}
    CIM_DNS_PORT=${toString contract.ports.dns}
    CIM_SSH_PORT=${toString contract.ports.ssh}
  '';

  # The install plan, built into the installer ISO from the host's disk-config.nix (as disko builds its script from
  # it, lib/disklayout.nix): no side channel at install time.
  installPlan =
    if host ? install then
      (import ./disklayout.nix {
        diskConfig = import (../. + "/${host.install.disk_config or "disk-config.nix"}");
        firmware = host.hardware.firmware or "uefi";
      }).script
    else "";
  own = inputs system;

  # Identifiers that tools would otherwise draw at random, derived from the host name (as NixOS fixes its image
  # UUIDs): the same host gives the same bytes on every machine.
  idHash = salt: builtins.hashString "sha256" "cim-demo ${salt} ${hostName}";
  hex = salt: start: len: builtins.substring start len (idHash salt);
  uuidOf = salt: "${hex salt 0 8}-${hex salt 8 4}-4${hex salt 13 3}-8${hex salt 17 3}-${hex salt 20 12}";
  ids = {
    rootUuid = uuidOf "root-uuid";       # ext4 file system UUID
    rootHashSeed = uuidOf "root-hash";   # ext4 htree hash seed
    firmwareVolumeId = hex "firmware" 0 8; # FAT volume serial of the SD image's FIRMWARE partition
    efiVolumeId = hex "efi" 0 8;         # FAT volume serial of the ISO's EFI boot image
    diskId = "0x${hex "disk" 0 8}";      # MBR disk identifier of the SD image
  };

  # Only this host's own facts, plus the names of its peers: editing another host leaves this one's hash alone.
  hostJson = builtins.toJSON {
    name = hostName;
    inherit system;
    inherit (domain) fqdn;
    domain = domain.name;
    inherit (host) hardware;
    guests = host.guests or [ ];
    accounts = map (a: { inherit (a) name; ssh_keys = a.ssh_keys or [ ]; groups = a.groups or [ ]; }) (domain.accounts or [ ]);
    peers = builtins.attrNames domain.hosts;
  };

  busyboxBuild = name: script: attrs: derivation ({
    inherit name system;
    builder = "${own.busybox}/bin/busybox";
    args = [ "sh" "-e" script ];
    busybox = own.busybox;
    common = ../builders/common.sh;
    SOURCE_DATE_EPOCH = toString sourceDateEpoch;
  } // attrs);

  # The guests, each isolated as a NixOS container is (see ../rootfs/sbin/cim-guest): a store path per guest holding
  # its root skeleton and what its PID 1 runs, on a bridge of the host whose address is .1 of the guests' /24.
  guests = host.guests or [ ];
  # The provisioner guest sits on the LAN bridge (lan0) with a LAN address; the others on the guests' bridge (br0).
  bridged = builtins.filter (g: g.kind != "provisioner") guests;
  network = address:
    let m = builtins.match "([0-9]+[.][0-9]+[.][0-9]+)[.][0-9]+" address;
    in if m == null then throw "domain.json: '${address}' is not an IPv4 address" else builtins.head m;
  gateway = if bridged == [ ] then "" else "${network (builtins.head bridged).address}.1";

  # The LAN: every declared MAC of the domain (the provisioner's allow-list and its leases), and this host's own.
  nicsOf = hv: hv.hardware.nics or [ ];
  lanMac = if nicsOf host == [ ] then "" else (builtins.head (nicsOf host)).mac;
  netbootHosts = builtins.filter (h: builtins.elem "netboot" (domain.hosts.${h}.images or [ ])) (builtins.attrNames domain.hosts);
  isProvisioner = (domain.provisioner or null) == hostName;
  lanRole = if isProvisioner then "provisioner" else if builtins.elem "netboot" (host.images or [ ]) then "dhcp" else "static";
  allowedMacs = builtins.concatLists (map (h: map (n: n.mac) (nicsOf domain.hosts.${h})) (builtins.attrNames domain.hosts));
  # dnsmasq's dhcp-host lines: MAC, a tag of the host's name, its declared address and name; nothing else leases.
  dhcpHosts = builtins.concatStringsSep "" (builtins.concatLists (map
    (h: map (n: "${n.mac},set:${h},${domain.hosts.${h}.address},${h}\n") (nicsOf domain.hosts.${h}))
    (builtins.attrNames domain.hosts)));
  netboots = map (h: { name = h; path = netbootOf h; }) netbootHosts;

  # The declared hardware as the network installer checks it before it writes a disk (sbin/cim-inventory check), and
  # the domain's policy: memory and disk sizes in MiB, the CPU's cores, every declared disk by device.
  # Only a host that installs itself from the LAN carries them (the policy is built into its image, as the plan is);
  # no other host's image changes with the domain's policy.
  hw = host.hardware;
  netinstalls = builtins.elem "netboot" (host.images or [ ]) && host ? install;
  hardwareLines = if !netinstalls then "" else "policy ${domain.inventory or "record"}\n"
    + "memory_mib ${toString (builtins.floor (hw.memory_gib * 1024))}\n"
    + "cpu_cores ${toString hw.cpu.cores}\n"
    + builtins.concatStringsSep "" (map (d: "disk ${d.device} ${toString (builtins.floor (d.size_gib * 1024))}\n")
        (builtins.filter (d: !(d.image or false)) (hw.disks or [ ])));
  # Where a netbooted machine reports to: the provisioner host's nats guest, through the provisioner host's LAN
  # address (it routes between the LAN and its guests' bridge).
  provisionerHost = if (domain.provisioner or null) == null then null else domain.hosts.${domain.provisioner};
  provisionerNats = if provisionerHost == null then [ ] else builtins.filter (g: g.kind == "nats") (provisionerHost.guests or [ ]);
  provisionerLines = if provisionerNats == [ ] || !netinstalls then "" else
    "nats=${(builtins.head provisionerNats).address}\nvia=${provisionerHost.address}\nguests=${network (builtins.head provisionerNats).address}.0/24\n";
  allGuests = builtins.concatLists (builtins.attrValues (builtins.mapAttrs
    (h: hv: map (g: g // { host = h; }) (hv.guests or [ ])) domain.hosts));
  # The dns guests' zone: <host>.<fqdn> and <guest>.<host>.<fqdn>, every one of the domain at its declared address.
  dnsHosts = builtins.concatStringsSep "" (
    builtins.attrValues (builtins.mapAttrs (h: hv: "${hv.address} ${h}.${domain.fqdn}\n") domain.hosts)
    ++ map (g: "${g.address} ${g.name}.${g.host}.${domain.fqdn}\n") allGuests);
  resolvers = map (g: g.address) (builtins.filter (g: g.kind == "dns") allGuests);
  accountLines = builtins.concatStringsSep "" (builtins.genList
    (i:
      let a = builtins.elemAt (domain.accounts or [ ]) i;
      in "${a.name} ${toString (1000 + i)}\n"
        + builtins.concatStringsSep "" (map (k: "+key ${a.name} ${k}\n") (a.ssh_keys or [ ]))
        + builtins.concatStringsSep "" (map (g: "+group ${a.name} ${g}\n") (a.groups or [ ])))
    (builtins.length (domain.accounts or [ ])));
  mkGuest = guest: busyboxBuild "cim-guest-${hostName}-${guest.name}" ../builders/guest.sh {
    inherit hostName system gateway;
    inherit (domain) fqdn;
    inherit (guest) kind address;
    guestName = guest.name;
    inherit (own) busybox services;
    guestTools = own.guest-tools;
    dnsHosts = if guest.kind == "dns" || guest.kind == "provisioner" then dnsHosts else "";
    dhcpHosts = if guest.kind == "provisioner" then dhcpHosts else "";
    netbootLines = if guest.kind == "provisioner" then builtins.concatStringsSep "" (map (n: "${n.name} ${n.path}\n") netboots) else "";
    resolvers = builtins.concatStringsSep " " resolvers;
    accountLines = if guest.kind == "dev" then accountLines else "";
  };
  guestSystems = map (g: g // { store = mkGuest g; }) guests;

  toplevel = busyboxBuild "nixos-system-${hostName}" ../builders/toplevel.sh ({
    inherit hostName hostJson system contractEnv;
    inherit (domain) fqdn;
    inherit (own) kernel services;
    guestLines = builtins.concatStringsSep "" (map (g: "${g.name} ${g.kind}\n") (host.guests or [ ]));
    # Accounts get uids from 1000 in domain.json order; each line: name uid, then its SSH public keys.
    inherit accountLines;
    # Each guest's supervisor line: name, store path, address, memory (MiB); the store paths the image carries.
    # Each line also names the bridge the guest's veth joins and its default route (none on the LAN).
    supervisorLines = builtins.concatStringsSep ""
      (map (g: "${g.name} ${g.store} ${g.address} ${toString (g.memory_mib or 256)} "
        + (if g.kind == "provisioner" then "lan0 -" else "br0 ${gateway}") + "\n") guestSystems);
    # The LAN interface: role (provisioner / dhcp / static), its MAC, the host's address; the allow-list.
    lanConfig = "role=${lanRole}\nmac=${lanMac}\naddress=${host.address}\n";
    lanAllowed = builtins.concatStringsSep "" (map (m: "${m}\n") allowedMacs);
    inherit hardwareLines provisionerLines;
    # What the guests run: busybox always (the host's own userland links to it), nats-server and glibc for any
    # guest, dnsmasq and dropbear only where a dns or dev guest runs them.
    storePaths = [ own.busybox ]
      ++ (if guests != [ ] || hostSsh then [ own.services ] else [ ])
      ++ (if hostSsh || builtins.any (g: g.kind == "dns" || g.kind == "dev" || g.kind == "provisioner") guests then [ own.guest-tools ] else [ ])
      ++ map (g: g.store) guestSystems
      ++ (if builtins.any (g: g.kind == "provisioner") guests then map (n: n.path) netboots else [ ]);
    # The provisioner's host runs nft, an installed host dropbear (both from the guest tools, with the services'
    # glibc).
    guestTools = if hostSsh || builtins.any (g: g.kind == "provisioner") guests then own.guest-tools else "";
    servicesPath = if guests != [ ] || hostSsh then own.services else "";
    hostSsh = if hostSsh then "1" else "";
    # What the next generation adds: files under /etc (environment.etc.<name>.text), and the boot counting.
    inherit etcNames bootTries;
    switchToConfiguration = ../builders/switch-to-configuration.sh;
    inherit gateway;
    natsAddress = let n = builtins.filter (g: g.kind == "nats") guests; in if n == [ ] then "" else (builtins.head n).address;
    statsInterval = toString (host.stats_interval_s or 5);
    rootfs = ../rootfs;
    consoleTty = if system == "aarch64-linux" then "ttyAMA0" else "ttyS0";
  } // builtins.listToAttrs (builtins.genList
    (i: { name = "etcText${toString i}"; value = etc.${builtins.elemAt etcNames i}.text; })
    (builtins.length etcNames)));

  images = {
    iso = busyboxBuild "nixos-${hostName}-${system}.iso" ../builders/iso.sh {
      inherit toplevel hostName installPlan;
      boot = own.boot;
      installerTools = own.installer-tools;
      layerTools = own.layer-tools;
      imageTools = own.image-tools;
      isoName = "nixos-${hostName}-${system}.iso";
      volumeId = "CIM_${builtins.replaceStrings [ "-" ] [ "_" ] hostName}";
      inherit (ids) efiVolumeId;
    };
    sd = busyboxBuild "nixos-sd-image-${hostName}-${system}" ../builders/sd.sh {
      inherit toplevel hostName;
      imageName = "nixos-sd-image-${hostName}-${system}.img";
      imageTools = own.image-tools;
      inherit (ids) rootUuid rootHashSeed firmwareVolumeId diskId;
    };
    # As nixpkgs' netboot: the kernel, an initrd holding the whole system, and the iPXE script that boots them.
    # Its initrd is a small stage 1 (../netboot/init): it takes a lease and fetches the system from the provisioner
    # over HTTP (run from RAM), or, on a blank declared disk of a host that has `install`, installs the system onto
    # it after checking the hardware; the system itself is not in it.
    netboot = busyboxBuild "nixos-netboot-${hostName}" ../builders/netboot.sh {
      inherit toplevel hostName installPlan;
      stage1 = ../netboot;
      boot = own.boot;
      installerTools = own.installer-tools;
    };
  };
  wants = format: builtins.elem format (host.images or [ ]);
in
{
  config.system.build =
    { inherit toplevel; }
    // (if wants "iso" then { isoImage = images.iso; } else { })
    // (if wants "sd" then { sdImage = images.sd; } else { })
    // (if wants "netboot" then { netboot = images.netboot; } else { });
}
