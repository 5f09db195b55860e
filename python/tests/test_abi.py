"""The generated layouts hang together: what the records parser relies on."""

import unittest

from connredir import _abi


class LayoutTest(unittest.TestCase):
    def test_every_format_is_its_struct(self):
        for name, layout in _abi.LAYOUTS.items():
            with self.subTest(name):
                self.assertEqual(layout.format.size, layout.size)
                self.assertEqual(len(layout.format.unpack(bytes(layout.size))), len(layout.fields))
                end = 0
                for field in layout.fields:
                    self.assertGreaterEqual(field.offset, end, field)
                    # uapi.h promises each field at its natural alignment.
                    if field.type not in _abi.LAYOUTS:
                        self.assertEqual(field.offset % (field.size // field.count), 0, field)
                    end = field.offset + field.size
                self.assertLessEqual(end, layout.size)
                self.assertEqual(layout.size % layout.align, 0)

    def test_nested_structs_are_laid_out(self):
        for layout in _abi.LAYOUTS.values():
            for field in layout.fields:
                if field.type in _abi.LAYOUTS:
                    self.assertEqual(field.size, _abi.LAYOUTS[field.type].size * field.count)

    def test_record_versions(self):
        record = _abi.connredir_record
        self.assertEqual(record.field("hops").count, _abi.CONNREDIR_MAX_HOPS)
        self.assertLess(record.offset("client_comm"), record.offset("seal"))
        self.assertEqual(record.offset("seal") + 8, record.size)
        with self.assertRaises(KeyError):
            record.field("nothing")

    def test_the_level_spells_cnr(self):
        self.assertEqual(_abi.CONNREDIR_SOL.to_bytes(3, "big"), b"CNR")
        self.assertEqual(_abi.CONNREDIR_RECORD_MAGIC.to_bytes(4, "little"), b"CNRR")


if __name__ == "__main__":
    unittest.main()
