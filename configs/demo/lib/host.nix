# One host of the domain: its system closure (toplevel) and the images domain.json asks for.
{ domain, hostName, host, inputs, sourceDateEpoch }:
let
  system = host.system;
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

  toplevel = busyboxBuild "nixos-system-${hostName}" ../builders/toplevel.sh {
    inherit hostName hostJson system;
    inherit (domain) fqdn;
    inherit (own) kernel services;
    guestLines = builtins.concatStringsSep "" (map (g: "${g.name} ${g.kind}\n") (host.guests or [ ]));
    # Accounts get uids from 1000 in domain.json order; each line: name uid, then its SSH public keys.
    accountLines = builtins.concatStringsSep "" (builtins.genList
      (i:
        let a = builtins.elemAt (domain.accounts or [ ]) i;
        in "${a.name} ${toString (1000 + i)}\n"
          + builtins.concatStringsSep "" (map (k: "+key ${a.name} ${k}\n") (a.ssh_keys or [ ])))
      (builtins.length (domain.accounts or [ ])));
    rootfs = ../rootfs;
    consoleTty = if system == "aarch64-linux" then "ttyAMA0" else "ttyS0";
  };

  images = {
    iso = busyboxBuild "nixos-${hostName}-${system}.iso" ../builders/iso.sh {
      inherit toplevel hostName;
      boot = own.boot;
      installerTools = own.installer-tools;
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
  };
  wants = format: builtins.elem format (host.images or [ ]);
in
{
  config.system.build =
    { inherit toplevel; }
    // (if wants "iso" then { isoImage = images.iso; } else { })
    // (if wants "sd" then { sdImage = images.sd; } else { });
}
