"""Public keys whose private keys were thrown away when they were made: the
signature check verifies against one of these when a merchant is unknown or
has no key of the signature's size, so that a failed check costs the same work
whoever is named (service.signing). Nobody can sign for them."""

DUMMY_PUBLIC_KEYS_PEM = {
    2048: (
        "-----BEGIN PUBLIC KEY-----\n"
        "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAvHrGpQttnjmrvrtU6Dr4\n"
        "+00oh3soOO176UdfvXKQZIpTYyynRb3niZj0DLvWIqYUa1bzrTi74NsHdUVZ5Ok3\n"
        "ljLyxzGZj5+Ykwbz5pKAfMded4BNH40SRk0U7wZViA7d7lJW685EP0WL/YJCQrYe\n"
        "7NE97m+CMMdKO2szRE2fbH/DaianNDUQmjfJJoNXFgxY5fvQdEwoToOHF2xXR/uB\n"
        "hdFbCaRekRXt5jbwVu9yk23o4ZddLfxWCNuvGq+q6PIGaGpI8ee0LISET6Ve52Qg\n"
        "60sGu3mPlHIJ96uUH86F6zABaO7gSk+I70J34vijv/eE6c1c/mlw+zNPvsBx4hBS\n"
        "fwIDAQAB\n"
        "-----END PUBLIC KEY-----\n"
    ),
    3072: (
        "-----BEGIN PUBLIC KEY-----\n"
        "MIIBojANBgkqhkiG9w0BAQEFAAOCAY8AMIIBigKCAYEAske6f88K5SyYeLLLUVLY\n"
        "bDOGkCXrnkVNu25df/TYKo083bIE9R2B99uJiPkfgXm/XqevWKsEgyGryCNHh2fy\n"
        "yrftlIvQI5R9gAyE5oum3FlfunPYNOVKATjpKYhw+CRQWIeuUvgUw+HEsSLyRw4R\n"
        "vK26JaETocplN/G345mFNC7kHqDESPaH9uTD5O1iPIwVbyGLDfxF/aY8WGAwCrYh\n"
        "GuWWouEBorai8fA4Sy5FervZs+jTzJ0w44eWKqAm9V1DqPWQbM9rgBW8A8WoeQEP\n"
        "yNhAah6N/VRKS6QTpozZlOGTgff0RPgPf7asBAbCeNC5urdo4X1lrq88OUINx48Y\n"
        "IO8d0+Y9esrPakeF7c/Nrui1hVmsIFOeJnbxtLDssMpjfYYDVMwDk/cJRpd67LoO\n"
        "l1Q+fGUbhqQ49cCPMbY0LnYzrlTeOdTm7nTSBppD3KRo8EL4UDDdW69nA1Yd9GEL\n"
        "phd2NpIC2Kh4WQwDJu+MfvpyYMK4BRm6ZhbflCvhOi1DAgMBAAE=\n"
        "-----END PUBLIC KEY-----\n"
    ),
    4096: (
        "-----BEGIN PUBLIC KEY-----\n"
        "MIICIjANBgkqhkiG9w0BAQEFAAOCAg8AMIICCgKCAgEAlw11a7ClyIQIOHzoOes+\n"
        "uLUUOxucpbopOdc3jA3HZ7xkNAsEwxi+IDJlTJq4p2s2piVQ3108Ym2ZLHE8d4c0\n"
        "munVWdTmxD4XUIkdC0CKAUVYBJ3dJ2zEoxFtXLEdVjRIuHlnfMKmJXldn92NC3rO\n"
        "AFijcFASoB9SxNlW3p+nkPImf99JubMia9eoA7AuTL+p/iB3CDA0F5Yze/Z/XYVW\n"
        "+YKGRILKck7DK7HKFwoIwPvDWJkYolIWaIgcTBtWPZvDNl+YcTcLG5pb5nhsQcTI\n"
        "AhB1P7UAzgxBjslxfybh8oxZMdAbPEQ8V++WUOdlpt3pasVPufbz1uUBhKpHo0Vb\n"
        "tjmDdPGzbw9a//LLIY2wwrUKOUmOVAJtWhngZM0MADB6RnHZePgwwLld8jfT+S2G\n"
        "jsfaNv1lcenltis8KU73HDdsOjoEycw1c4Y5wfnsDgjJ2bN3Bn+5gLeNgf5kxIaz\n"
        "DBMGD0ZXia7JG5DbnDzcL3igNR8c89YsUSEpHJ6nbQHxVwsdSqxcCZs3SGy8RhaS\n"
        "j3o3MNhzuiCNvSXL6LWlF6H73yduUzUUNWqjFVvhxekEeUmbYPq8x9Fdb+fMCs/c\n"
        "+08Ha061FvRl2GB583S/4uPBHhIZ5ruCzSWheh2M5H3FOWXxu+LY6rV0ClacRq8b\n"
        "zF35SDHt0fbV2j4nM1hhCrECAwEAAQ==\n"
        "-----END PUBLIC KEY-----\n"
    ),
}
