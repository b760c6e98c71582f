#!/usr/bin/env bash
# Builds a throwaway development PKI for ztgate tests and the quickstart demo.
#
# Usage: scripts/dev-pki.sh DIR
#
# Deletes DIR and recreates it with a root CA, an intermediate device CA, a gateway server
# certificate, an unrelated CA and a set of device certificates (good ones and negative
# fixtures). All keys are ECDSA P-256 and all signatures are ECDSA with SHA-256.
# docs/dev-pki.md lists every file and the outcome the gateway should give each certificate.
#
# Optional environment variables:
#   CRL_URL   when set, device certificates carry crlDistributionPoints = URI:$CRL_URL
#   OCSP_URL  when set, device certificates carry authorityInfoAccess = OCSP;URI:$OCSP_URL
#
# The openssl `ca` config and databases stay in DIR/ca/, so later tooling can revoke a
# device and run `openssl ca -gencrl` against them. The config contains absolute paths,
# so moving DIR breaks it: rerun the script instead.
#
# Requires the openssl command line, version 3.0 or later. Prints one summary line on
# success. On failure it prints an error message and the tail of DIR/dev-pki.log, then
# exits with status 1. A wrong number of arguments exits with status 2.

set -Eeuo pipefail

readonly ROOT_SUBJECT="/O=ztgate Dev/CN=ztgate Dev Root CA"
readonly DEVICE_CA_SUBJECT="/O=ztgate Dev/CN=ztgate Dev Device CA"
readonly OTHER_CA_SUBJECT="/O=ztgate Dev/CN=ztgate Dev Unrelated CA"
readonly GATEWAY_SUBJECT="/O=ztgate Dev/OU=gateway/CN=apps.example.test"

# Made-up private OIDs under the enterprise arc 1.3.6.1.4.1.55555, for testing only.
readonly OID_HARDWARE_BOUND="1.3.6.1.4.1.55555.1.1"
readonly OID_ID_ASSIGNER="1.3.6.1.4.1.55555.2"
readonly OID_HW_TYPE="1.3.6.1.4.1.55555.3.1"
# otherName type OIDs from RFC 4043 (permanentIdentifier) and RFC 4108 (hardwareModuleName).
readonly OID_PERMANENT_IDENTIFIER="1.3.6.1.5.5.7.8.3"
readonly OID_HARDWARE_MODULE_NAME="1.3.6.1.5.5.7.8.4"

fail() {
    printf 'dev-pki: %s\n' "$*" >&2
    exit 1
}

usage() {
    printf 'usage: %s DIR\n' "${0##*/}" >&2
    printf 'Deletes DIR and writes a development PKI into it (see docs/dev-pki.md).\n' >&2
    exit 2
}

# Prints a failure message and the tail of the openssl log, then exits with status 1.
report_failure() {
    trap - ERR
    printf 'dev-pki: %s\n' "$1" >&2
    if [[ -n ${LOG:-} && -f $LOG ]]; then
        printf -- '--- last lines of %s ---\n' "$LOG" >&2
        tail -n 25 "$LOG" >&2
    fi
    exit 1
}

# Reports a failed command other than openssl by the first line of its text (the ERR trap).
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

# Rejects characters that the OpenSSL config parser treats specially ($ expands a
# variable, # starts a comment, \ and quotes escape) and commas, which split the
# extension value into several names.
check_config_value() {
    local name=$1 value=$2
    if [[ $value =~ [[:cntrl:]\$\#\\\"\',] ]]; then
        fail "$name contains a character that cannot go into an openssl config (\$ # \\ quotes , or control characters): $value"
    fi
}

check_url() {
    local name=$1 value=$2
    check_config_value "$name" "$value"
    if [[ ! $value =~ ^[A-Za-z][A-Za-z0-9+.-]*://[^[:space:]]+$ ]]; then
        fail "$name is not an absolute URL without spaces (for example http://127.0.0.1:18081/device-ca.crl): $value"
    fi
}

# Writes the fixed part of the openssl config, which contains the three CA databases, the
# DN policy and the extension sections for the CAs and the gateway certificate.
write_ca_config() {
    local name
    cat >"$CA_CNF" <<EOF
# openssl config for the ztgate development PKI, written by scripts/dev-pki.sh.
# It is rewritten on every run and contains absolute paths.
#
# Revoke a device and publish a new device CA CRL:
#   openssl ca -config $CA_CNF -name device_ca -revoke $DIR/DEV-0002.pem -crl_reason keyCompromise
#   openssl ca -config $CA_CNF -name device_ca -gencrl -crlhours 1 -out $DIR/device-ca.crl.pem

[ req ]
distinguished_name = req_dn
prompt             = no

[ req_dn ]
CN = unused

[ policy_any ]
organizationName       = optional
organizationalUnitName = optional
commonName             = supplied

[ crl_ext ]
authorityKeyIdentifier = keyid:always
EOF

    for name in root-ca device-ca other-ca; do
        cat >>"$CA_CNF" <<EOF

[ ${name//-/_} ]
database         = $CA_DIR/$name/index.txt
serial           = $CA_DIR/$name/serial
crlnumber        = $CA_DIR/$name/crlnumber
new_certs_dir    = $CA_DIR/$name/certs
certificate      = $DIR/$name.pem
private_key      = $DIR/$name.key
default_md       = sha256
default_days     = 365
default_crl_days = 1
policy           = policy_any
unique_subject   = no
copy_extensions  = none
crl_extensions   = crl_ext
EOF
    done

    cat >>"$CA_CNF" <<'EOF'

# Self-signed roots: the development root CA and the unrelated CA.
[ ext_root_ca ]
basicConstraints     = critical, CA:true
keyUsage             = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ ext_device_ca ]
basicConstraints       = critical, CA:true, pathlen:0
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always

[ ext_gateway ]
basicConstraints       = critical, CA:false
keyUsage               = critical, digitalSignature
extendedKeyUsage       = serverAuth
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
subjectAltName         = DNS:*.apps.example.test, DNS:apps.example.test, DNS:localhost, IP:127.0.0.1, IP:::1
EOF
}

# Appends the extension sections of one device certificate to the config.
#   $1 device name (the CN and the last SPIFFE path segment)
#   $2 extendedKeyUsage value, or "none" to leave the extension out
#   $3 permanentIdentifier identifierValue, or "malformed" for a UTF8String in place of
#      the SEQUENCE that RFC 4043 requires
#   $4 hardwareModuleName serial number (stored as OCTET STRING bytes)
#   $5 "hardware-bound" to add the private hardware-bound extension, "plain" to leave it out
write_device_extensions() {
    local device=$1 eku=$2 serial_number=$3 hw_serial=$4 binding=$5
    local section
    section=$(device_section "$device")

    {
        printf '\n[ ext_%s ]\n' "$section"
        printf 'basicConstraints       = critical, CA:false\n'
        printf 'keyUsage               = critical, digitalSignature\n'
        if [[ $eku != none ]]; then
            printf 'extendedKeyUsage       = %s\n' "$eku"
        fi
        printf 'subjectKeyIdentifier   = hash\n'
        printf 'authorityKeyIdentifier = keyid:always\n'
        printf 'subjectAltName         = @san_%s\n' "$section"
        if [[ -n $CRL_URL ]]; then
            printf 'crlDistributionPoints  = URI:%s\n' "$CRL_URL"
        fi
        if [[ -n $OCSP_URL ]]; then
            printf 'authorityInfoAccess    = OCSP;URI:%s\n' "$OCSP_URL"
        fi
        # Non-critical on purpose, so that verifiers that do not know the OID still accept it.
        if [[ $binding == hardware-bound ]]; then
            printf '%s  = ASN1:UTF8String:hardware-bound:tpm2\n' "$OID_HARDWARE_BOUND"
        fi

        printf '\n[ san_%s ]\n' "$section"
        printf 'URI.1       = spiffe://example.test/device/%s\n' "$device"
        if [[ $serial_number == malformed ]]; then
            printf 'otherName.1 = %s;UTF8:not-a-sequence\n' "$OID_PERMANENT_IDENTIFIER"
        else
            printf 'otherName.1 = %s;SEQUENCE:permanent_id_%s\n' "$OID_PERMANENT_IDENTIFIER" "$section"
        fi
        printf 'otherName.2 = %s;SEQUENCE:hw_module_%s\n' "$OID_HARDWARE_MODULE_NAME" "$section"

        if [[ $serial_number != malformed ]]; then
            # PermanentIdentifier ::= SEQUENCE { identifierValue UTF8String, assigner OBJECT IDENTIFIER }
            printf '\n[ permanent_id_%s ]\n' "$section"
            printf 'identifierValue = UTF8:%s\n' "$serial_number"
            printf 'assigner        = OID:%s\n' "$OID_ID_ASSIGNER"
        fi

        # HardwareModuleName ::= SEQUENCE { hwType OBJECT IDENTIFIER, hwSerialNum OCTET STRING }
        printf '\n[ hw_module_%s ]\n' "$section"
        printf 'hwType      = OID:%s\n' "$OID_HW_TYPE"
        printf 'hwSerialNum = FORMAT:ASCII,OCTETSTRING:%s\n' "$hw_serial"
    } >>"$CA_CNF"
}

# Maps a device name to a config section suffix, for example DEV-0001 -> dev_0001.
device_section() {
    local section=${1,,}
    printf '%s' "${section//-/_}"
}

# Creates an empty `openssl ca` database. Serial numbers start at a different hex
# prefix per CA so that a serial in a log shows which CA issued it.
init_ca_database() {
    local name=$1 first_serial=$2
    mkdir -p "$CA_DIR/$name/certs"
    : >"$CA_DIR/$name/index.txt"
    printf '%s\n' "$first_serial" >"$CA_DIR/$name/serial"
    printf '1000\n' >"$CA_DIR/$name/crlnumber"
}

# Generates a P-256 key (PKCS#8 PEM, mode 0600) and a CSR for it.
new_key_and_csr() {
    local name=$1 subject=$2
    run_openssl req -new -config "$CA_CNF" \
        -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc \
        -keyout "$DIR/$name.key" -subj "$subject" -out "$CA_DIR/csr/$name.csr"
    chmod 600 "$DIR/$name.key"
}

new_self_signed_ca() {
    local name=$1 subject=$2
    run_openssl req -x509 -new -config "$CA_CNF" -extensions ext_root_ca \
        -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc -sha256 -days 3650 \
        -keyout "$DIR/$name.key" -subj "$subject" -out "$DIR/$name.pem"
    chmod 600 "$DIR/$name.key"
}

# Signs a CSR from DIR/ca/csr with `openssl ca`, recording it in that CA's database.
#   $1 CA section name, $2 certificate name, $3 extension section, then extra `openssl ca` options
sign_with_ca() {
    local ca_section=$1 name=$2 extensions=$3
    shift 3
    run_openssl ca -batch -notext -config "$CA_CNF" -name "$ca_section" \
        -extensions "$extensions" "$@" \
        -in "$CA_DIR/csr/$name.csr" -out "$DIR/$name.pem"
}

# Issues one device certificate and writes NAME.pem, NAME.key and NAME-chain.pem.
#   $1 device name, $2 issuing CA file name (device-ca or other-ca),
#   then options for `openssl ca` (validity)
issue_device() {
    local device=$1 issuer=$2
    shift 2
    new_key_and_csr "$device" "/O=ztgate Dev/OU=devices/CN=$device"
    sign_with_ca "${issuer//-/_}" "$device" "ext_$(device_section "$device")" "$@"
    cat "$DIR/$device.pem" "$DIR/$issuer.pem" >"$DIR/$device-chain.pem"
}

main() {
    [[ $# -eq 1 && -n $1 ]] || usage
    # EPOCHREALTIME needs bash 5, and ${var,,} needs bash 4.
    ((BASH_VERSINFO[0] >= 5)) || fail "bash 5 or later is required, found: $BASH_VERSION"
    CRL_URL=${CRL_URL:-}
    OCSP_URL=${OCSP_URL:-}
    [[ -z $CRL_URL ]] || check_url CRL_URL "$CRL_URL"
    [[ -z $OCSP_URL ]] || check_url OCSP_URL "$OCSP_URL"

    command -v openssl >/dev/null || fail "openssl not found in PATH"
    local version
    version=$(openssl version)
    [[ $version =~ ^OpenSSL\ ([3-9]|[1-9][0-9])\. ]] ||
        fail "OpenSSL 3.0 or later is required, found: $version"

    local started=$EPOCHREALTIME
    mkdir -p -- "$1"
    DIR=$(cd -- "$1" && pwd -P)
    [[ $DIR != / ]] || fail "/ cannot be the output directory; pass a new or empty directory"
    check_config_value DIR "$DIR"
    # Wipe only an empty directory or the output of an earlier run, so that a mistyped
    # argument cannot delete unrelated files.
    if [[ -n $(ls -A -- "$DIR") && ! -e $DIR/ca/ca.cnf && ! -e $DIR/dev-pki.log ]]; then
        fail "$DIR is not empty and was not written by this script; pass an empty or new directory"
    fi
    rm -rf -- "$DIR"
    mkdir -p -- "$DIR"
    readonly DIR
    readonly CA_DIR=$DIR/ca
    readonly CA_CNF=$CA_DIR/ca.cnf
    readonly LOG=$DIR/dev-pki.log
    : >"$LOG"
    trap 'on_error "$?" "$LINENO" "$BASH_COMMAND"' ERR

    mkdir -p "$CA_DIR/csr"
    init_ca_database root-ca 1000
    init_ca_database device-ca 2000
    init_ca_database other-ca 3000
    write_ca_config
    write_device_extensions DEV-0001 clientAuth SN-A1B2C3D4 TPM-0001 hardware-bound
    write_device_extensions DEV-0002 clientAuth SN-E5F6A7B8 TPM-0002 hardware-bound
    write_device_extensions DEV-0003 clientAuth SN-C0FFEE03 TPM-0003 plain
    write_device_extensions DEV-SERVERAUTH serverAuth SN-5E4A0004 TPM-0004 hardware-bound
    write_device_extensions DEV-NOEKU none SN-0E0E0005 TPM-0005 hardware-bound
    write_device_extensions DEV-EXPIRED clientAuth SN-E0E00006 TPM-0006 hardware-bound
    write_device_extensions DEV-BADID clientAuth malformed TPM-0007 hardware-bound
    write_device_extensions DEV-ROGUE clientAuth SN-0B0E0008 TPM-0008 hardware-bound

    new_self_signed_ca root-ca "$ROOT_SUBJECT"
    new_self_signed_ca other-ca "$OTHER_CA_SUBJECT"

    new_key_and_csr device-ca "$DEVICE_CA_SUBJECT"
    sign_with_ca root_ca device-ca ext_device_ca -days 1825
    cat "$DIR/device-ca.pem" "$DIR/root-ca.pem" >"$DIR/device-ca-chain.pem"

    new_key_and_csr gateway "$GATEWAY_SUBJECT"
    sign_with_ca root_ca gateway ext_gateway -days 365
    cat "$DIR/gateway.pem" "$DIR/root-ca.pem" >"$DIR/gateway-chain.pem"

    local device
    for device in DEV-0001 DEV-0002 DEV-0003 DEV-SERVERAUTH DEV-NOEKU DEV-BADID; do
        issue_device "$device" device-ca -days 365
    done
    issue_device DEV-EXPIRED device-ca -startdate 20240101000000Z -enddate 20240201000000Z
    issue_device DEV-ROGUE other-ca -days 365

    local elapsed
    elapsed=$(awk -v start="$started" -v end="$EPOCHREALTIME" 'BEGIN { printf "%.2f", end - start }')
    printf 'dev-pki: wrote 3 CA, 1 gateway and 8 device certificates to %s in %ss (CRL_URL: %s, OCSP_URL: %s)\n' \
        "$DIR" "$elapsed" "${CRL_URL:-unset}" "${OCSP_URL:-unset}"
}

main "$@"
