#!/usr/bin/env bash
# Builds the certificate zoo: device certificates and CAs at the edges of the profile that
# ztgate accepts, for tests/zoo.rs.
#
# Usage: scripts/zoo-pki.sh DIR
#
# Deletes DIR and recreates it. For every fixture NAME it writes NAME.pem (the leaf),
# NAME.key (the device key, mode 0600) and NAME-chain.pem (what the device sends: the
# leaf and its intermediates). CA certificates are CA-NAME.pem. Chain fixtures get extra
# chain files (chain-*.pem). docs/configuration.md ("Certificate profile") lists the
# outcome the gateway gives each kind of certificate, and tests/zoo.rs checks it.
#
# Every certificate is signed with `openssl x509 -req -set_serial`, so serial numbers
# are chosen per fixture. Validity is 365 days from the run.
#
# Requires bash 5 and the openssl command line 3.0 or later. Prints one summary line on
# success. On failure it prints the failed command and the tail of DIR/zoo-pki.log and
# exits with status 1. A wrong number of arguments exits with status 2.

set -Eeuo pipefail

# Made-up private OIDs under the enterprise arc 1.3.6.1.4.1.55555, for testing only.
# The hardware-bound mark is the same OID as in scripts/dev-pki.sh.
readonly OID_HARDWARE_BOUND="1.3.6.1.4.1.55555.1.1"
readonly OID_UNKNOWN_EXTENSION="1.3.6.1.4.1.55555.9.1"
readonly OID_ID_ASSIGNER="1.3.6.1.4.1.55555.2"
readonly OID_HW_TYPE="1.3.6.1.4.1.55555.3.1"
readonly OID_PERMANENT_IDENTIFIER="1.3.6.1.5.5.7.8.3"
readonly OID_HARDWARE_MODULE_NAME="1.3.6.1.5.5.7.8.4"
# Microsoft's userPrincipalName otherName, which ztgate does not read.
readonly OID_UPN="1.3.6.1.4.1.311.20.2.3"
readonly TRUST_DOMAIN="zoo.example.test"

fail() {
    printf 'zoo-pki: %s\n' "$*" >&2
    exit 1
}

usage() {
    printf 'usage: %s DIR\n' "${0##*/}" >&2
    printf 'Deletes DIR and writes the certificate zoo into it.\n' >&2
    exit 2
}

report_failure() {
    trap - ERR
    printf 'zoo-pki: %s\n' "$1" >&2
    if [[ -n ${LOG:-} && -f $LOG ]]; then
        printf -- '--- last lines of %s ---\n' "$LOG" >&2
        tail -n 25 "$LOG" >&2
    fi
    exit 1
}

on_error() {
    local status=$1 line=$2 command=$3
    report_failure "command failed at line $line (exit status $status): ${command%%$'\n'*}"
}

# Runs openssl with its output appended to the log, after the command line itself.
run_openssl() {
    {
        printf '+ openssl'
        printf ' %q' "$@"
        printf '\n'
    } >>"$LOG"
    if ! openssl "$@" >>"$LOG" 2>&1; then
        report_failure "openssl $1 failed, see the log below for the command and its output"
    fi
}

# Writes the openssl configs: the extension sections in zoo.cnf and one request config
# per string_mask, which decides how `openssl req -utf8 -subj` encodes each attribute.
write_configs() {
    local mask
    for mask in utf8only default pkix; do
        cat >"$DIR/req-$mask.cnf" <<EOF
[ req ]
distinguished_name = req_dn
prompt             = no
string_mask        = $mask
utf8               = yes

[ req_dn ]
CN = unused
EOF
    done

    cat >"$CNF" <<EOF
# openssl extension sections of the certificate zoo, written by scripts/zoo-pki.sh.

[ ext_root ]
basicConstraints     = critical, CA:true
keyUsage             = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ ext_ca ]
basicConstraints       = critical, CA:true
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always

[ ext_ca_pathlen0 ]
basicConstraints       = critical, CA:true, pathlen:0
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always

[ ext_ca_nc_dns ]
basicConstraints       = critical, CA:true
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
nameConstraints        = critical, permitted;DNS:$TRUST_DOMAIN

[ ext_ca_nc_uri ]
basicConstraints       = critical, CA:true
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
nameConstraints        = critical, permitted;URI:$TRUST_DOMAIN

[ ext_ca_critical_unknown ]
basicConstraints       = critical, CA:true
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
$OID_UNKNOWN_EXTENSION = critical, ASN1:NULL

[ permanent_id_with_assigner ]
identifierValue = UTF8:ZOO-SN-0001
assigner        = OID:$OID_ID_ASSIGNER

[ permanent_id_no_assigner ]
identifierValue = UTF8:ZOO-SN-0001

[ hw_module ]
hwType      = OID:$OID_HW_TYPE
hwSerialNum = FORMAT:ASCII,OCTETSTRING:TPM-ZOO-1

[ dir_name ]
O  = ztgate Zoo
CN = directory name
EOF
}

# Appends a leaf extension section ext_NAME and its SAN section san_NAME.
#   $1 fixture name, $2 SAN lines ("" for no subjectAltName), $3 extra extension lines
leaf_extensions() {
    local name=$1 san=$2 extra=${3:-}
    local section=${name//-/_}
    {
        printf '\n[ ext_%s ]\n' "$section"
        printf 'basicConstraints       = critical, CA:false\n'
        printf 'keyUsage               = critical, digitalSignature\n'
        printf 'extendedKeyUsage       = clientAuth\n'
        printf 'subjectKeyIdentifier   = hash\n'
        printf 'authorityKeyIdentifier = keyid:always\n'
        if [[ -n $san ]]; then
            printf 'subjectAltName         = @san_%s\n' "$section"
        fi
        if [[ -n $extra ]]; then
            printf '%s\n' "$extra"
        fi
        if [[ -n $san ]]; then
            printf '\n[ san_%s ]\n%s\n' "$section" "$san"
        fi
    } >>"$CNF"
}

# The default SAN: the fixture's SPIFFE ID.
spiffe_san() {
    printf 'URI.1 = spiffe://%s/device/%s' "$TRUST_DOMAIN" "$1"
}

# Generates a private key (PKCS#8 PEM, mode 0600).
#   $1 output file, $2 key type: p256, p384, p521, ed25519, rsa2048 or rsapss
new_key() {
    local out=$1 type=$2
    local -a options
    case $type in
    p256) options=(-algorithm EC -pkeyopt ec_paramgen_curve:P-256) ;;
    p384) options=(-algorithm EC -pkeyopt ec_paramgen_curve:P-384) ;;
    p521) options=(-algorithm EC -pkeyopt ec_paramgen_curve:P-521) ;;
    ed25519) options=(-algorithm ED25519) ;;
    rsa2048) options=(-algorithm RSA -pkeyopt rsa_keygen_bits:2048) ;;
    # An RSA key whose SubjectPublicKeyInfo restricts it to RSASSA-PSS (RFC 4055).
    rsapss) options=(-algorithm RSA-PSS -pkeyopt rsa_keygen_bits:2048) ;;
    *) fail "unknown key type $type" ;;
    esac
    run_openssl genpkey "${options[@]}" -out "$out"
    chmod 600 "$out"
}

# Rewrites an RSA-PSS PKCS#8 key as a PKCS#1 "RSA PRIVATE KEY", the same RSA key
# without the PSS restriction, because ring signs only with rsaEncryption keys. The
# certificate keeps the PSS-restricted public key.
pss_key_as_pkcs1() {
    local key=$1 offset
    offset=$(openssl asn1parse -in "$key" | awk -F: '/d=1 .*OCTET STRING/ { print $1 + 0; exit }')
    [[ -n $offset ]] || fail "no OCTET STRING in the PKCS#8 key $key"
    run_openssl asn1parse -in "$key" -strparse "$offset" -noout -out "$key.pkcs1.der"
    {
        printf -- '-----BEGIN RSA PRIVATE KEY-----\n'
        openssl base64 -in "$key.pkcs1.der"
        printf -- '-----END RSA PRIVATE KEY-----\n'
    } >"$key.tmp"
    rm -f "$key.pkcs1.der"
    mv "$key.tmp" "$key"
    chmod 600 "$key"
}

# The signing options of a CA, by the type of its key: the digest, and for
# RSA-PSS signatures the padding.
declare -A SIGN_OPTIONS=()

# Writes a certificate signing request.
#   $1 key file, $2 subject, $3 string_mask (utf8only, default or pkix), $4 output
new_csr() {
    run_openssl req -new -config "$DIR/req-$3.cnf" -utf8 -key "$1" -subj "$2" -out "$4"
}

# Creates a self-signed root CA-NAME.pem with key CA-NAME.key.
#   $1 name, $2 key type, $3 subject
new_root() {
    local name=$1 type=$2 subject=$3
    new_key "$DIR/CA-$name.key" "$type"
    new_csr "$DIR/CA-$name.key" "$subject" utf8only "$DIR/csr/CA-$name.csr"
    SIGN_OPTIONS[$name]=$(digest_for "$type")
    # shellcheck disable=SC2086 # the options are words
    run_openssl x509 -req -in "$DIR/csr/CA-$name.csr" -signkey "$DIR/CA-$name.key" \
        ${SIGN_OPTIONS[$name]} -days 3650 -set_serial "0x$(serial_for "CA-$name")" \
        -extfile "$CNF" -extensions ext_root -out "$DIR/CA-$name.pem"
}

digest_for() {
    case $1 in
    ed25519) printf '' ;;
    p384) printf -- '-sha384' ;;
    p521) printf -- '-sha512' ;;
    *) printf -- '-sha256' ;;
    esac
}

# A stable, positive 8-byte serial derived from a name, for certificates whose serial
# is not under test.
serial_for() {
    printf '%s' "$1" | openssl dgst -sha256 -r | cut -c1-16 | sed 's/^./4/'
}

# Signs a CSR with a CA.
#   $1 CSR, $2 issuing CA name, $3 extension section, $4 serial (as for -set_serial),
#   $5 output; then extra `openssl x509` options
sign() {
    local csr=$1 ca=$2 extensions=$3 serial=$4 out=$5
    shift 5
    # shellcheck disable=SC2086 # the options are words
    run_openssl x509 -req -in "$csr" -CA "$DIR/CA-$ca.pem" -CAkey "$DIR/CA-$ca.key" \
        ${SIGN_OPTIONS[$ca]} -days 365 -set_serial "$serial" \
        -extfile "$CNF" -extensions "$extensions" "$@" -out "$out"
}

# Creates an intermediate CA-NAME.pem issued by CA-ISSUER.
#   $1 name, $2 issuer, $3 key type, $4 extension section, $5 subject,
#   $6 string_mask (default utf8only), $7 signing options (default by key type)
new_ca() {
    local name=$1 issuer=$2 type=$3 extensions=$4 subject=$5 mask=${6:-utf8only}
    new_key "$DIR/CA-$name.key" "$type"
    new_csr "$DIR/CA-$name.key" "$subject" "$mask" "$DIR/csr/CA-$name.csr"
    SIGN_OPTIONS[$name]=${7:-$(digest_for "$type")}
    sign "$DIR/csr/CA-$name.csr" "$issuer" "$extensions" "0x$(serial_for "CA-$name")" \
        "$DIR/CA-$name.pem"
}

# Issues a device certificate NAME.pem with key NAME.key, and NAME-chain.pem with the
# leaf followed by the CA files given after the options.
#   $1 name, $2 issuing CA, then key=TYPE (default p256), serial=SERIAL (default
#   derived from the name), mask=MASK (default utf8only), subject=SUBJECT (default
#   /O=ztgate Zoo/CN=NAME), then "--" and the chain's CA names.
issue_leaf() {
    local name=$1 ca=$2
    shift 2
    local type=p256 serial="" mask=utf8only subject="/O=ztgate Zoo/CN=$name"
    while (($# > 0)) && [[ $1 != -- ]]; do
        case $1 in
        key=*) type=${1#key=} ;;
        serial=*) serial=${1#serial=} ;;
        mask=*) mask=${1#mask=} ;;
        subject=*) subject=${1#subject=} ;;
        *) fail "unknown issue_leaf option $1" ;;
        esac
        shift
    done
    [[ ${1:-} != -- ]] || shift
    [[ -n $serial ]] || serial=0x$(serial_for "$name")

    new_key "$DIR/$name.key" "$type"
    new_csr "$DIR/$name.key" "$subject" "$mask" "$DIR/csr/$name.csr"
    sign "$DIR/csr/$name.csr" "$ca" "ext_${name//-/_}" "$serial" "$DIR/$name.pem"
    if [[ $type == rsapss ]]; then
        pss_key_as_pkcs1 "$DIR/$name.key"
    fi
    write_chain "$name" "$DIR/$name.pem" "$@"
}

# Writes NAME-chain.pem from a leaf file and CA names.
write_chain() {
    local name=$1 leaf=$2
    shift 2
    local ca
    {
        cat "$leaf"
        for ca in "$@"; do
            cat "$DIR/CA-$ca.pem"
        done
    } >"$DIR/$name-chain.pem"
}

# The issuing CAs: every key type and signature algorithm, string encodings of the CA
# name, name constraints and an unknown critical extension.
make_cas() {
    new_root root p256 "/O=ztgate Zoo/CN=Zoo Root CA"
    new_ca issuing root p256 ext_ca "/O=ztgate Zoo/CN=Zoo Issuing CA"
    new_ca p384 root p384 ext_ca "/O=ztgate Zoo/CN=Zoo P-384 CA"
    new_ca p521 root p521 ext_ca "/O=ztgate Zoo/CN=Zoo P-521 CA"
    new_ca ed25519 root ed25519 ext_ca "/O=ztgate Zoo/CN=Zoo Ed25519 CA"
    new_ca rsa2048 root rsa2048 ext_ca "/O=ztgate Zoo/CN=Zoo RSA 2048 CA"
    new_ca rsa-sha1 root rsa2048 ext_ca "/O=ztgate Zoo/CN=Zoo RSA SHA-1 CA" utf8only -sha1
    # RSASSA-PSS signatures (SHA-256, MGF1 with SHA-256, 32-byte salt) by an rsaEncryption key.
    new_ca rsa-pss-sig root rsa2048 ext_ca "/O=ztgate Zoo/CN=Zoo RSA-PSS Signature CA" utf8only \
        "-sha256 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:digest -sigopt rsa_mgf1_md:sha256"
    # A CA whose own key is restricted to RSASSA-PSS.
    new_ca rsa-pss-key root rsapss ext_ca "/O=ztgate Zoo/CN=Zoo RSA-PSS Key CA" utf8only \
        "-sha256 -sigopt rsa_pss_saltlen:digest -sigopt rsa_mgf1_md:sha256"

    new_ca printable root p256 ext_ca "/O=ztgate Zoo/CN=Zoo Printable CA" default
    new_ca bmp root p256 ext_ca "/O=ztgate Zoo/CN=Zoo BMP CA Ω" pkix
    # The printable CA's key and name text, but the name in UTF8String: signing with it
    # gives a leaf whose issuer field differs in encoding from the CA's subject.
    new_csr "$DIR/CA-printable.key" "/O=ztgate Zoo/CN=Zoo Printable CA" utf8only \
        "$DIR/csr/CA-printable-utf8.csr"
    run_openssl x509 -req -in "$DIR/csr/CA-printable-utf8.csr" -signkey "$DIR/CA-printable.key" \
        -sha256 -days 365 -set_serial 0x01 -extfile "$CNF" -extensions ext_root \
        -out "$DIR/CA-printable-utf8.pem"
    cp "$DIR/CA-printable.key" "$DIR/CA-printable-utf8.key"
    SIGN_OPTIONS[printable-utf8]=-sha256

    new_ca nc-dns root p256 ext_ca_nc_dns "/O=ztgate Zoo/CN=Zoo DNS Name Constraint CA"
    new_ca nc-uri root p256 ext_ca_nc_uri "/O=ztgate Zoo/CN=Zoo URI Name Constraint CA"
    new_ca critical-unknown root p256 ext_ca_critical_unknown "/O=ztgate Zoo/CN=Zoo Critical Extension CA"
    new_ca pathlen0 root p256 ext_ca_pathlen0 "/O=ztgate Zoo/CN=Zoo Path Length 0 CA"
    new_ca below-pathlen0 pathlen0 p256 ext_ca "/O=ztgate Zoo/CN=Zoo CA below Path Length 0"
}

# Serial numbers at the edges of RFC 5280 section 4.1.2.2 (positive, at most 20 octets).
make_serial_fixtures() {
    local name
    for name in serial-1-byte serial-20-bytes serial-high-bit serial-21-bytes serial-zero; do
        leaf_extensions "$name" "$(spiffe_san "$name")"
    done
    issue_leaf serial-1-byte issuing serial=0x01 -- issuing
    # 20 content octets with the high bit clear.
    issue_leaf serial-20-bytes issuing serial=0x7f0102030405060708090a0b0c0d0e0f10111213 -- issuing
    # 19 octets of magnitude with the high bit set: DER adds a zero byte, giving 20 octets.
    issue_leaf serial-high-bit issuing serial=0x80a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2 -- issuing
    # 20 octets of magnitude with the high bit set: 21 content octets, over the limit.
    issue_leaf serial-21-bytes issuing serial=0x80a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3 -- issuing
    issue_leaf serial-zero issuing serial=0 -- issuing
}

# Unusual but valid subjectAltName forms, and several identities in one certificate.
make_san_fixtures() {
    leaf_extensions san-many-uris "URI.1 = https://$TRUST_DOMAIN/enroll/7
URI.2 = urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66
URI.3 = spiffe://$TRUST_DOMAIN/device/san-many-uris
URI.4 = mailto:device@$TRUST_DOMAIN"
    leaf_extensions san-dns-uri-email "DNS.1 = device-7.$TRUST_DOMAIN
URI.1 = spiffe://$TRUST_DOMAIN/device/san-dns-uri-email
email.1 = device-7@$TRUST_DOMAIN"
    leaf_extensions san-email-only "email.1 = device-8@$TRUST_DOMAIN"
    leaf_extensions san-permanent-no-assigner \
        "otherName.1 = $OID_PERMANENT_IDENTIFIER;SEQUENCE:permanent_id_no_assigner"
    leaf_extensions san-permanent-with-assigner \
        "otherName.1 = $OID_PERMANENT_IDENTIFIER;SEQUENCE:permanent_id_with_assigner"
    leaf_extensions san-every-form "DNS.1 = device-9.$TRUST_DOMAIN
IP.1 = 192.0.2.9
IP.2 = 2001:db8::9
email.1 = device-9@$TRUST_DOMAIN
RID.1 = 1.3.6.1.4.1.55555.4.1
dirName.1 = dir_name
otherName.1 = $OID_UPN;UTF8:device-9@$TRUST_DOMAIN
otherName.2 = $OID_PERMANENT_IDENTIFIER;SEQUENCE:permanent_id_with_assigner
otherName.3 = $OID_HARDWARE_MODULE_NAME;SEQUENCE:hw_module
URI.1 = spiffe://$TRUST_DOMAIN/device/san-every-form"
    leaf_extensions san-two-spiffe "URI.1 = spiffe://$TRUST_DOMAIN/device/a
URI.2 = spiffe://$TRUST_DOMAIN/device/b"
    leaf_extensions san-none ""

    local name
    for name in san-many-uris san-dns-uri-email san-email-only san-permanent-no-assigner \
        san-permanent-with-assigner san-every-form san-two-spiffe san-none; do
        issue_leaf "$name" issuing -- issuing
    done
}

# Extensions ztgate does not know, critical and not.
make_extension_fixtures() {
    leaf_extensions ext-unknown-noncritical "$(spiffe_san ext-unknown-noncritical)" \
        "$OID_UNKNOWN_EXTENSION = ASN1:UTF8String:zoo"
    leaf_extensions ext-unknown-critical "$(spiffe_san ext-unknown-critical)" \
        "$OID_UNKNOWN_EXTENSION = critical, ASN1:UTF8String:zoo"
    leaf_extensions ext-hardware-bound "$(spiffe_san ext-hardware-bound)" \
        "$OID_HARDWARE_BOUND = ASN1:UTF8String:hardware-bound:tpm2"
    leaf_extensions ext-hardware-bound-critical "$(spiffe_san ext-hardware-bound-critical)" \
        "$OID_HARDWARE_BOUND = critical, ASN1:UTF8String:hardware-bound:tpm2"
    leaf_extensions ext-ca-critical-unknown "$(spiffe_san ext-ca-critical-unknown)"
    leaf_extensions ext-pathlen-exceeded "$(spiffe_san ext-pathlen-exceeded)"

    issue_leaf ext-unknown-noncritical issuing -- issuing
    issue_leaf ext-unknown-critical issuing -- issuing
    issue_leaf ext-hardware-bound issuing -- issuing
    issue_leaf ext-hardware-bound-critical issuing -- issuing
    issue_leaf ext-ca-critical-unknown critical-unknown -- critical-unknown
    issue_leaf ext-pathlen-exceeded below-pathlen0 -- below-pathlen0 pathlen0
}

# Subject and issuer names in UTF8String, PrintableString, T61String and BMPString.
make_name_fixtures() {
    local name
    for name in name-utf8 name-printable name-t61 name-bmp name-multi-valued \
        issuer-printable issuer-bmp issuer-reencoded; do
        leaf_extensions "$name" "$(spiffe_san "$name")"
    done
    issue_leaf name-utf8 issuing "subject=/O=ztgate Zoo/CN=Gerät 7 ✓" -- issuing
    # string_mask default: PrintableString where the text allows it, else T61String.
    issue_leaf name-printable issuing mask=default "subject=/O=ztgate Zoo/CN=Zoo Device 7" -- issuing
    issue_leaf name-t61 issuing mask=default "subject=/O=ztgate Zoo/CN=Gerät 7" -- issuing
    # string_mask pkix: PrintableString where the text allows it, else BMPString.
    issue_leaf name-bmp issuing mask=pkix "subject=/O=ztgate Zoo/CN=Gerät 7 Ω" -- issuing
    issue_leaf name-multi-valued issuing \
        "subject=/O=ztgate Zoo/OU=devices+UID=device-7/CN=name-multi-valued/emailAddress=device-7@$TRUST_DOMAIN" \
        -- issuing
    issue_leaf issuer-printable printable -- printable
    issue_leaf issuer-bmp bmp -- bmp
    # Signed by the printable CA's key, but its issuer field is the UTF8String form.
    issue_leaf issuer-reencoded printable-utf8 -- printable
}

# Device keys of every type under the P-256 issuing CA, and P-256 devices under CAs of
# every key type and signature algorithm.
make_algorithm_fixtures() {
    local type ca
    for type in p384 ed25519 rsa2048 rsapss; do
        leaf_extensions "key-$type" "$(spiffe_san "key-$type")"
        issue_leaf "key-$type" issuing "key=$type" -- issuing
    done
    for ca in p384 p521 ed25519 rsa2048 rsa-sha1 rsa-pss-sig rsa-pss-key; do
        leaf_extensions "ca-$ca" "$(spiffe_san "ca-$ca")"
        issue_leaf "ca-$ca" "$ca" -- "$ca"
    done
    # Same key type as the CA, as a device CA for one kind of hardware would issue.
    leaf_extensions ca-ed25519-key-ed25519 "$(spiffe_san ca-ed25519-key-ed25519)"
    issue_leaf ca-ed25519-key-ed25519 ed25519 key=ed25519 -- ed25519
    leaf_extensions ca-p384-key-p384 "$(spiffe_san ca-p384-key-p384)"
    issue_leaf ca-p384-key-p384 p384 key=p384 -- p384
    leaf_extensions ca-rsa-pss-sig-key-rsa2048 "$(spiffe_san ca-rsa-pss-sig-key-rsa2048)"
    issue_leaf ca-rsa-pss-sig-key-rsa2048 rsa-pss-sig key=rsa2048 -- rsa-pss-sig
}

# Name constraints on the issuing CA: a permitted DNS subtree and a permitted URI subtree.
make_name_constraint_fixtures() {
    leaf_extensions nc-dns-inside "DNS.1 = device-10.$TRUST_DOMAIN
URI.1 = spiffe://$TRUST_DOMAIN/device/nc-dns-inside"
    leaf_extensions nc-dns-outside "DNS.1 = device-11.other.example
URI.1 = spiffe://$TRUST_DOMAIN/device/nc-dns-outside"
    leaf_extensions nc-uri-inside "URI.1 = spiffe://$TRUST_DOMAIN/device/nc-uri-inside"
    leaf_extensions nc-uri-outside "URI.1 = spiffe://other.example/device/nc-uri-outside"
    leaf_extensions nc-uri-no-uri \
        "otherName.1 = $OID_PERMANENT_IDENTIFIER;SEQUENCE:permanent_id_with_assigner"
    issue_leaf nc-dns-inside nc-dns -- nc-dns
    issue_leaf nc-dns-outside nc-dns -- nc-dns
    issue_leaf nc-uri-inside nc-uri -- nc-uri
    issue_leaf nc-uri-outside nc-uri -- nc-uri
    issue_leaf nc-uri-no-uri nc-uri -- nc-uri
}

# A two-level chain (chain-root, chain-int1, chain-int2) and the chain files a device
# may send: complete, partial, leaf only, out of order, with the root, with an
# unrelated CA and with an entry that is not a certificate.
make_chain_fixtures() {
    new_root chain-root p256 "/O=ztgate Zoo/CN=Zoo Chain Root CA"
    new_ca chain-int1 chain-root p256 ext_ca "/O=ztgate Zoo/CN=Zoo Chain Intermediate 1"
    new_ca chain-int2 chain-int1 p256 ext_ca "/O=ztgate Zoo/CN=Zoo Chain Intermediate 2"
    cat "$DIR/CA-chain-int1.pem" "$DIR/CA-chain-int2.pem" >"$DIR/CA-chain-intermediates.pem"
    leaf_extensions chain-leaf "$(spiffe_san chain-leaf)"
    issue_leaf chain-leaf chain-int2 -- chain-int2 chain-int1

    write_chain chain-full "$DIR/chain-leaf.pem" chain-int2 chain-int1
    write_chain chain-leaf-only "$DIR/chain-leaf.pem"
    write_chain chain-partial "$DIR/chain-leaf.pem" chain-int2
    write_chain chain-reversed "$DIR/chain-leaf.pem" chain-int1 chain-int2
    write_chain chain-with-root "$DIR/chain-leaf.pem" chain-int2 chain-int1 chain-root
    write_chain chain-unrelated-first "$DIR/chain-leaf.pem" issuing root chain-int2 chain-int1
    {
        cat "$DIR/chain-leaf.pem"
        printf -- '-----BEGIN CERTIFICATE-----\n%s\n-----END CERTIFICATE-----\n' \
            "$(printf 'not a certificate' | openssl base64)"
        cat "$DIR/CA-chain-int2.pem" "$DIR/CA-chain-int1.pem"
    } >"$DIR/chain-garbage-chain.pem"
    local name
    for name in chain-full chain-leaf-only chain-partial chain-reversed chain-with-root \
        chain-unrelated-first chain-garbage; do
        cp "$DIR/chain-leaf.key" "$DIR/$name.key"
        chmod 600 "$DIR/$name.key"
    done
}

# Cross-signing: one intermediate (cross-int) certified by two roots, cross-a and
# cross-b, and root cross-a certified by cross-b.
make_cross_fixtures() {
    new_root cross-a p256 "/O=ztgate Zoo/CN=Zoo Cross Root A"
    new_root cross-b p256 "/O=ztgate Zoo/CN=Zoo Cross Root B"

    new_key "$DIR/CA-cross-int.key" p256
    new_csr "$DIR/CA-cross-int.key" "/O=ztgate Zoo/CN=Zoo Cross Intermediate" utf8only \
        "$DIR/csr/CA-cross-int.csr"
    sign "$DIR/csr/CA-cross-int.csr" cross-a ext_ca "0x$(serial_for int-by-a)" "$DIR/CA-cross-int-by-a.pem"
    sign "$DIR/csr/CA-cross-int.csr" cross-b ext_ca "0x$(serial_for int-by-b)" "$DIR/CA-cross-int-by-b.pem"
    # Either certificate names the same subject and key, so either can sign as issuer.
    cp "$DIR/CA-cross-int-by-a.pem" "$DIR/CA-cross-int.pem"
    SIGN_OPTIONS[cross-int]=-sha256

    run_openssl x509 -x509toreq -in "$DIR/CA-cross-a.pem" -signkey "$DIR/CA-cross-a.key" \
        -out "$DIR/csr/CA-cross-a-by-b.csr"
    sign "$DIR/csr/CA-cross-a-by-b.csr" cross-b ext_ca "0x$(serial_for a-by-b)" "$DIR/CA-cross-a-by-b.pem"

    leaf_extensions cross-leaf "$(spiffe_san cross-leaf)"
    issue_leaf cross-leaf cross-int -- cross-int-by-a
    write_chain cross-via-a "$DIR/cross-leaf.pem" cross-int-by-a
    write_chain cross-via-both "$DIR/cross-leaf.pem" cross-int-by-a cross-int-by-b
    write_chain cross-via-root-a "$DIR/cross-leaf.pem" cross-int-by-a cross-a-by-b
    local name
    for name in cross-via-a cross-via-both cross-via-root-a; do
        cp "$DIR/cross-leaf.key" "$DIR/$name.key"
        chmod 600 "$DIR/$name.key"
    done
}

main() {
    [[ $# -eq 1 && -n $1 ]] || usage
    ((BASH_VERSINFO[0] >= 5)) || fail "bash 5 or later is required, found: $BASH_VERSION"
    command -v openssl >/dev/null || fail "openssl not found in PATH"
    local version
    version=$(openssl version)
    [[ $version =~ ^OpenSSL\ ([3-9]|[1-9][0-9])\. ]] ||
        fail "OpenSSL 3.0 or later is required, found: $version"

    mkdir -p -- "$1"
    DIR=$(cd -- "$1" && pwd -P)
    [[ $DIR != / ]] || fail "/ cannot be the output directory; pass a new or empty directory"
    # Wipe only an empty directory or the output of an earlier run.
    if [[ -n $(ls -A -- "$DIR") && ! -e $DIR/zoo-pki.log ]]; then
        fail "$DIR is not empty and was not written by this script; pass an empty or new directory"
    fi
    rm -rf -- "$DIR"
    mkdir -p -- "$DIR/csr"
    readonly DIR
    readonly CNF=$DIR/zoo.cnf
    readonly LOG=$DIR/zoo-pki.log
    : >"$LOG"
    trap 'on_error "$?" "$LINENO" "$BASH_COMMAND"' ERR
    local started=$EPOCHREALTIME

    write_configs
    make_cas
    make_serial_fixtures
    make_san_fixtures
    make_extension_fixtures
    make_name_fixtures
    make_algorithm_fixtures
    make_name_constraint_fixtures
    make_chain_fixtures
    make_cross_fixtures

    local elapsed
    elapsed=$(awk -v start="$started" -v end="$EPOCHREALTIME" 'BEGIN { printf "%.2f", end - start }')
    printf 'zoo-pki: wrote %s certificates to %s in %ss\n' \
        "$(find "$DIR" -maxdepth 1 -name '*.pem' ! -name '*-chain.pem' | wc -l)" "$DIR" "$elapsed"
}

main "$@"
