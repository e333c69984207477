# The guests of a host, as domain.json declares them: each a NixOS container with a private network on a bridge only
# the host and its guests share, at the address domain.json gives it (the bridge takes .1 of the guests' /24), with
# the memory and CPUs domain.json gives it. A guest of kind provisioner is the exception: it serves the LAN, so its
# veth joins the host's LAN bridge (./lan.nix) at its LAN address (./provisioner.nix says what it runs). The demo
# domain runs the same guests as busybox namespaces (README).
{
  config,
  lib,
  domain,
  hostName,
  netbootOf,
  systemOf,
  cachePort,
  ...
}:
let
  host = domain.hosts.${hostName};
  inherit (domain) fqdn;
  guests = host.guests or [ ];
  # The ports the pipeline's probes use (the image contract, ./contract.json): NATS clients and DNS.
  inherit (lib.importJSON ./contract.json) ports;

  bridge = "br-guests";
  onLan = guest: guest.kind == "provisioner";
  bridged = lib.filter (guest: !onLan guest) guests;
  prefix = lib.concatStringsSep "." (lib.take 3 (lib.splitString "." (lib.head bridged).address));
  gateway = "${prefix}.1";
  addressOfKind =
    kind:
    let
      found = lib.filter (guest: guest.kind == kind) guests;
    in
    if found == [ ] then throw "${hostName} has no ${kind} guest in domain.json" else (lib.head found).address;

  kindsHere = map (guest: guest.kind) guests;
  forwards = lib.filter (forward: lib.elem forward.kind kindsHere && (forward.hubOnly or false -> isHub)) [
    { proto = "tcp"; port = ports.nats; kind = "nats"; } # NATS clients
    { proto = "tcp"; port = 7422; kind = "nats"; hubOnly = true; } # NATS leaf nodes (the other hosts)
    { proto = "udp"; port = ports.dns; kind = "dns"; }
    { proto = "tcp"; port = ports.dns; kind = "dns"; }
  ];
  # The domain's one NATS hub, whose nats guest every other host's nats guest joins as a leaf node: the provisioner
  # (the domain's first machine, which the others boot from) when the domain names one, else its first hypervisor.
  hub =
    domain.provisioner or (lib.findFirst (name: (domain.hosts.${name}.role or "") == "hypervisor") null (
      lib.attrNames domain.hosts
    ));
  isHub = hostName == hub;

  # Every name the dns guests answer: <host>.<fqdn> at the host's LAN address, <guest>.<host>.<fqdn> at the guest's.
  dnsGuests = lib.concatLists (
    lib.mapAttrsToList (name: other: lib.filter (guest: guest.kind == "dns") (other.guests or [ ])) domain.hosts
  );
  # The resolvers a guest can reach: its own host's dns guests on the guests' bridge; else each host with a dns guest
  # at its LAN address, which forwards port 53 to that guest (`forwards` below). Another host's guest bridge is
  # private to it: a guest of vhost-pi cannot reach the dns guest on vhost-dev's bridge.
  localDns = lib.filter (guest: guest.kind == "dns") guests;
  resolvers =
    if localDns != [ ] then
      map (dns: dns.address) localDns
    else
      lib.mapAttrsToList (name: other: other.address) (
        lib.filterAttrs (name: other: lib.any (guest: guest.kind == "dns") (other.guests or [ ])) domain.hosts
      );
  records =
    lib.mapAttrs' (name: address: lib.nameValuePair "${name}.${fqdn}" address) config.cim.addresses
    // lib.concatMapAttrs (
      name: other:
      lib.listToAttrs (map (guest: lib.nameValuePair "${guest.name}.${name}.${fqdn}" guest.address) (other.guests or [ ]))
    ) domain.hosts;

  # What every guest shares: its place on the guest network, and the domain's dns guests as its resolvers. The
  # provisioner's guest is on the LAN, which has no router: it answers there and asks nobody.
  guestBase = guest: {
    networking = {
      domain = fqdn;
      useHostResolvConf = false;
    }
    // lib.optionalAttrs (!onLan guest) {
      defaultGateway = {
        address = gateway;
        interface = "eth0";
      };
      nameservers = resolvers;
    };
    time.timeZone = "UTC";
    system.stateVersion = config.system.stateVersion;
  };

  # What each kind of guest runs.
  kinds = {
    nats = guest: {
      services.nats = {
        enable = true;
        serverName = "${hostName}-${guest.name}";
        port = ports.nats;
        jetstream = true;
        settings = {
          host = "0.0.0.0"; # nats-server's own `host` (the module's `host` option is gone from nixpkgs)
          # JetStream runs on both ends of the leafnode link: each side its own JetStream domain, so the hub's and a
          # leaf's streams and their API subjects ($JS.<domain>.API) stay apart instead of colliding.
          jetstream.domain = hostName;
          leafnodes = if isHub then { port = 7422; } else config.cim.natsLeafRemotes;
        };
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
            guest.address
          ];
          # The guests, and the LAN through the host's port forward (which keeps the client's address).
          access-control = [
            "127.0.0.0/8 allow"
            "::1/128 allow"
            "10.0.0.0/8 allow"
            "172.16.0.0/12 allow"
            "192.168.0.0/16 allow"
          ];
          # unbound writes these values verbatim, so they carry their own quotes. A static zone: a name of the
          # domain that is not declared gets NXDOMAIN.
          local-zone = [ ''"${fqdn}." static'' ];
          local-data = lib.mapAttrsToList (name: address: ''"${name}. IN A ${address}"'') records;
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
        environment.systemPackages = [ pkgs.git ];
      };

    provisioner =
      guest:
      import ./provisioner.nix {
        inherit
          domain
          guest
          records
          netbootOf
          systemOf
          cachePort
          ;
      };
  };
in
{
  options.cim = {
    guestBridge = lib.mkOption {
      type = lib.types.str;
      readOnly = true;
      internal = true;
      description = "The bridge the host's guests share.";
    };
    guestAddressOfKind = lib.mkOption {
      type = lib.types.functionTo lib.types.str;
      readOnly = true;
      internal = true;
      description = "The address of the host's first guest of a kind (nats, dns, dev).";
    };
    guestConfig = lib.mkOption {
      type = lib.types.attrsOf lib.types.deferredModule;
      default = { };
      description = "Extra NixOS configuration for a guest's container, by guest name (e.g. the dev guest's GPU tools).";
    };
    natsLeafRemotes = lib.mkOption {
      type = lib.types.attrsOf lib.types.anything;
      default = { };
      description = "The nats guest's `leafnodes` settings on a host that is not the hub (default: the hub's leaf port).";
    };
  };

  config = lib.mkIf (guests != [ ]) {
    cim.guestBridge = bridge;
    cim.guestAddressOfKind = addressOfKind;

    networking.bridges = lib.mkIf (bridged != [ ]) { ${bridge}.interfaces = [ ]; };
    networking.interfaces = lib.mkIf (bridged != [ ]) {
      ${bridge}.ipv4.addresses = [
        {
          address = gateway;
          prefixLength = 24;
        }
      ];
    };
    networking.hosts = lib.listToAttrs (
      map (guest: lib.nameValuePair guest.address [ "${guest.name}.${hostName}.${fqdn}" guest.name ]) guests
    );
    # The guests reach the LAN through the host, and the host forwards the services the LAN uses (DNS, NATS and, on
    # the hub, NATS's leaf-node port) from its own address to the guest that serves them. The firewall is nftables
    # (the provisioner's MAC filter is an nftables table too, ./lan.nix), so the forwards are an nftables table of
    # their own; NixOS's nat module masquerades what the guests send out.
    networking.nftables.enable = true;
    networking.nat = lib.mkIf (bridged != [ ]) {
      enable = true;
      internalInterfaces = [ bridge ];
    };
    # nat.forwardPorts needs the external interface's name, which a DHCP host that also boots in QEMU does not have;
    # match "addressed to this host, not coming from a guest" instead.
    networking.nftables.tables.cim-forward = lib.mkIf (forwards != [ ]) {
      family = "ip";
      content = ''
        chain prerouting {
          type nat hook prerouting priority dstnat; policy accept;
          ${lib.concatMapStringsSep "\n  " (
            forward:
            "iifname != \"${bridge}\" fib daddr type local ${forward.proto} dport ${toString forward.port} "
            + "dnat to ${addressOfKind forward.kind}:${toString forward.port}"
          ) forwards}
        }
      '';
    };

    containers = lib.listToAttrs (
      map (
        guest:
        lib.nameValuePair guest.name {
          autoStart = true;
          privateNetwork = true;
          hostBridge = if onLan guest then config.cim.lanBridge else bridge;
          localAddress = "${guest.address}/24";
          config = {
            imports = [
              (guestBase guest)
              (kinds.${guest.kind} guest)
              (config.cim.guestConfig.${guest.name} or { })
            ];
          };
        }
      ) guests
    );

    # Each container gets the memory and CPUs domain.json gives its guest.
    systemd.services = lib.listToAttrs (
      map (
        guest:
        lib.nameValuePair "container@${guest.name}" {
          serviceConfig =
            lib.optionalAttrs (guest ? memory_mib) { MemoryMax = "${toString guest.memory_mib}M"; }
            // lib.optionalAttrs (guest ? vcpus) { CPUQuota = "${toString (guest.vcpus * 100)}%"; };
        }
      ) guests
    );

    # A host that is not the hub joins the hub's NATS as a leaf node, at the hub's leaf-node port.
    cim.natsLeafRemotes = lib.mkIf (!isHub && hub != null) (
      lib.mkDefault {
        remotes = [ { url = "nats-leaf://${config.cim.addresses.${hub}}:7422"; } ];
      }
    );

    # The host reports its guests (configuration.nix's cim-stats) to its own nats guest.
    cim.stats = {
      natsUrl = lib.mkIf (lib.any (guest: guest.kind == "nats") guests) "nats://${addressOfKind "nats"}:${toString ports.nats}";
      guests = lib.listToAttrs (map (guest: lib.nameValuePair guest.name guest.name) guests);
      interval = "${toString (host.stats_interval_s or 5)}s";
    };
  };
}
