{
  description = "cim development: the NixOS hosts of the cim.local domain, their guests and their images";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    disko = {
      url = "github:nix-community/disko";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      disko,
      ...
    }:
    let
      inherit (nixpkgs) lib;

      # The source of truth for hosts, hardware, guests and accounts; the pipeline validates it before Nix reads it.
      domain = builtins.fromJSON (builtins.readFile ./domain.json);
      # The image contract: the names the pipeline looks for in every image (its pipeline/contract.json, copied here;
      # `validate` refuses a copy that drifted). configuration.nix reads it too.
      contract = builtins.fromJSON (builtins.readFile ./contract.json);
      forHost = hostName: builtins.replaceStrings [ "{host}" ] [ hostName ];

      # A netboot host's image as a store path (the `netboot` image below). The provisioner's system refers to every
      # one of them (its provisioner guest serves them, provisioner.nix), so its own image carries them.
      netbootOf = hostName: self.nixosConfigurations.${hostName}.config.system.build.netboot;
      # A host's installed system, which a netboot host with an `install` section installs from the provisioner's
      # binary cache: the provisioner's system refers to it too (provisioner.nix), so its cache holds it.
      systemOf = hostName: self.nixosConfigurations.${hostName}.config.system.build.toplevel;
      # The port of the provisioner's binary cache on the LAN (provisioner.nix serves it, netinstall.nix uses it).
      cachePort = 5000;

      hostModule =
        hostName:
        let
          file = ./hosts + "/${hostName}.nix";
        in
        if builtins.pathExists file then
          file
        else
          throw "domain.json names the host '${hostName}', but configs/cim/hosts/${hostName}.nix does not exist";

      # The ISO is the host itself, booted live from the image (that is what the pipeline boot-tests), plus NixOS's
      # minimal installer. For an installable host it also carries the installed system and `cim-install`, which lays
      # out the disk with disko (its script is built into the image from disk-config.nix) and installs without
      # network. The install runs unattended, then powers off, when the machine carries the systemd credential the
      # contract names (`cim.install`): in QEMU `-smbios type=11,value=io.systemd.credential:cim.install=1` (what the
      # pipeline passes), on the kernel command line `systemd.set_credential=cim.install:1`. It prints the contract's
      # started, done, or failed-with-the-reason line on the console.
      isoModule =
        hostName: host: installed:
        { config, lib, pkgs, ... }:
        {
          imports = [ "${nixpkgs}/nixos/modules/installer/cd-dvd/installation-cd-minimal.nix" ];
          cim.image = "iso";
        }
        // lib.optionalAttrs (host ? install) (
          let
            disk = installed.disko.devices.disk.${host.install.disk or "main"}.device;
            line = name: forHost hostName contract.install.${name};
            cimInstall = pkgs.writeShellApplication {
              name = "cim-install";
              runtimeInputs = [
                config.system.build.nixos-install
                pkgs.nixos-enter
                config.nix.package
                pkgs.util-linux
              ];
              text = ''
                fail() { echo "${line "failed"} $*"; exit 1; }
                trap 'fail "a command failed (status $?) at line $LINENO of cim-install"' ERR
                echo "${line "started"} onto ${disk}"
                ${installed.system.build.destroyFormatMount}/bin/disko-destroy-format-mount --yes-wipe-all-disks \
                  || fail "disko could not lay out ${disk} as disk-config.nix declares"
                nixos-install --root /mnt --system ${installed.system.build.toplevel} --no-root-passwd --no-channel-copy \
                  || fail "nixos-install could not install the system onto ${disk}"
                umount --recursive /mnt || fail "could not unmount /mnt after the install"
                echo "${line "done"}: installed on ${disk}; powering off"
              '';
            };
          in
          {
            # The live system must not mount or swap on the disk it is about to install onto.
            disko.enableConfig = false;
            environment.systemPackages = [ cimInstall ];
            systemd.services.cim-install = {
              description = "Unattended install of ${hostName} onto ${disk}";
              wantedBy = [ "multi-user.target" ];
              # Ordered after the target itself (as cim-boot-complete is), so the live system is up first.
              after = [
                "multi-user.target"
                "cim-boot-complete.service"
              ];
              unitConfig.ConditionCredential = contract.install.credential;
              serviceConfig = {
                Type = "oneshot";
                StandardOutput = "journal+console";
                StandardError = "journal+console";
                # The credential's value, in $CREDENTIALS_DIRECTORY: ConditionCredential only says it exists.
                ImportCredential = contract.install.credential;
              };
              # Only cim.install=1 installs (=0, or anything else, leaves the disk alone). Powers off after an
              # install either way: the failed line has said why.
              script = ''
                value=$(cat "$CREDENTIALS_DIRECTORY/${contract.install.credential}" 2>/dev/null || true)
                if [ "$value" != 1 ]; then
                  echo "cim-install: credential ${contract.install.credential}=$value is not 1: nothing is installed"
                  exit 0
                fi
                ${lib.getExe cimInstall} || true
                systemctl --no-block poweroff
              '';
            };
          }
        );

      # An SD card image is the whole system of an aarch64 board: firmware, U-Boot and an ext4 root (NIXOS_SD).
      sdModule = {
        imports = [ "${nixpkgs}/nixos/modules/installer/sd-card/sd-image-aarch64.nix" ];
        cim.image = "sd";
        # The pipeline publishes and boots the raw image (`file sd-image ….img`), not a .zst.
        sdImage.compressImage = false;
      };

      # A netboot image, laid out as nixpkgs' netboot Hydra job (nixos/release.nix) lays it out: the kernel, the initrd
      # and the iPXE script that boots them, side by side (the script names the other two relative to its own URL),
      # named by nix-support/hydra-build-products. `extra` adds to the directory what no product names.
      netbootDir =
        pkgs: name: build: kernel: extra:
        pkgs.runCommand "netboot-${name}" { } ''
          mkdir -p $out/nix-support
          ln -s ${build.kernel}/${kernel} $out/${kernel}
          ln -s ${build.netbootRamdisk}/initrd $out/initrd
          ln -s ${build.netbootIpxeScript}/netboot.ipxe $out/netboot.ipxe
          ${extra}
          {
            echo "file kernel $out/${kernel}"
            echo "file initrd $out/initrd"
            echo "file ipxe $out/netboot.ipxe"
          } > $out/nix-support/hydra-build-products
        '';

      # The host's system booted from the LAN by the provisioner (docs/netboot.md), run from RAM: NixOS's netboot
      # module gives the kernel, an initrd carrying the whole store as a squashfs, and the iPXE script. `cmdline` is
      # the kernel command line that script gives, for the network installer's kexec (below). A host that is also
      # installed does not mount or swap on its disk while it runs from RAM.
      netbootModule =
        host:
        { config, pkgs, ... }:
        let
          kernel = config.system.boot.loader.kernelFile; # bzImage: the name netboot.ipxe gives the kernel
          cmdline =
            "init=${config.system.build.toplevel}/init ${toString config.boot.kernelParams}";
        in
        {
          imports = [ "${nixpkgs}/nixos/modules/installer/netboot/netboot.nix" ];
          cim.image = "netboot";
          system.build.netboot =
            netbootDir pkgs config.networking.hostName config.system.build kernel
              "echo -n ${lib.escapeShellArg cmdline} > $out/cmdline";
        }
        // lib.optionalAttrs (host ? install) { disko.enableConfig = false; };

      # A netboot host with an `install` section boots the network installer instead (./netinstall.nix): nixpkgs'
      # netboot-minimal.nix plus one service that installs the host's system from the provisioner's binary cache onto a
      # blank disk (disko, from the host's disk-config.nix), or else boots the host's own system, which the directory
      # carries under system/ (the image above) for the provisioner to serve. The installer is an evaluation of its
      # own; it names the installed system by its store path only, so that system stays out of its initrd.
      installerNetboot =
        hostName: host: installed: ram:
        let
          installer = lib.nixosSystem {
            inherit (host) system;
            specialArgs = { inherit domain hostName installed cachePort; };
            modules = [
              "${nixpkgs}/nixos/modules/installer/netboot/netboot-minimal.nix"
              ./netinstall.nix
              (
                { config, pkgs, ... }:
                {
                  system.build.netboot =
                    let
                      kernel = config.system.boot.loader.kernelFile;
                    in
                    netbootDir pkgs "${hostName}-installer" config.system.build kernel
                      "ln -s ${ram} $out/system";
                  system.stateVersion = installed.system.stateVersion;
                }
              )
            ];
          };
        in
        installer.config.system.build.netboot;

      # `nixosConfigurations.<host>` is the installed system; each image the host asks for is that system extended
      # with NixOS's image module, exposed where NixOS puts it (`config.system.build.isoImage`/`.sdImage`, and
      # `.netboot` as above). The definitions are mkDefault: inside the extended configuration the image module's own
      # definition wins, so these are never evaluated there and nothing recurses.
      imagesModule =
        hostName: host:
        { config, lib, extendModules, ... }:
        let
          wants = format: lib.elem format (host.images or [ ]);
          imageOf = module: (extendModules { modules = [ module ]; }).config.system.build;
        in
        {
          system.build =
            lib.optionalAttrs (wants "iso") {
              isoImage = lib.mkDefault (imageOf (isoModule hostName host config)).isoImage;
            }
            // lib.optionalAttrs (wants "sd") {
              sdImage = lib.mkDefault (imageOf sdModule).sdImage;
            }
            // lib.optionalAttrs (wants "netboot") {
              netboot = lib.mkDefault (
                if host ? install then
                  installerNetboot hostName host config (imageOf (netbootModule host)).netboot
                else
                  (imageOf (netbootModule host)).netboot
              );
            };
        };

      # A host's committed hardware report (nixos-facter's facter.json, as nixos-anywhere's
      # `--generate-hardware-config nixos-facter ./hosts/<host>.facter.json` leaves it), read by NixOS's own
      # hardware.facter module when it exists. `cim inventory <host> --facter hosts/<host>.facter.json` compares it
      # with domain.json.
      # Only the installed system reads it: the images (ISO, SD, netboot) boot on other machines and in QEMU, and
      # nixos-facter's modules act on what the report holds (its graphics module, for one, turns on the NVIDIA
      # driver and its initrd modules for the 7920's card).
      facterModule =
        hostName:
        { config, ... }:
        let
          report = ./hosts + "/${hostName}.facter.json";
        in
        {
          config = lib.mkIf (builtins.pathExists report && config.cim.image == null) {
            hardware.facter.reportPath = report;
          };
        };

      mkHost =
        hostName: host:
        lib.nixosSystem {
          inherit (host) system;
          specialArgs = {
            inherit
              domain
              hostName
              netbootOf
              systemOf
              cachePort
              ;
          };
          modules = [
            ./configuration.nix
            (hostModule hostName)
            (facterModule hostName)
            (imagesModule hostName host)
          ]
          ++ lib.optionals (host ? install) [
            disko.nixosModules.disko
            (./. + "/${host.install.disk_config or "disk-config.nix"}")
          ];
        };
    in
    {
      nixosConfigurations = lib.mapAttrs mkHost domain.hosts;
    };
}
